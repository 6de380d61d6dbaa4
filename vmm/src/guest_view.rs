//! The vmm's side of the guest channel (`devices::guest_channel`): what the API shows of the
//! guest's own view (its user space is ready; the plugged memory it has online), and the
//! questions that keep the guest's report current while a long poll waits for it.
//!
//! A question carries a tag made from the virtio-mem configuration generation, which changes
//! with every change of the plugged, usable or requested size: a report that carries the tag of
//! the current generation was scanned in the guest after the memory last changed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::guest_channel::{GuestChannel, GuestView};
use memory::HotplugRegion;

/// While a report is not current, the guest is asked again this long after the last question
/// was answered (the guest's onlining may still be under way)...
const ASK_AGAIN: Duration = Duration::from_secs(1);
/// ...or this long after a question nobody answered (no reporter, or the question was lost).
const ASK_UNANSWERED: Duration = Duration::from_secs(5);

/// The last question sent to the guest.
struct Asked {
    tag: u64,
    at: Instant,
}

/// The guest channel as the API uses it.
pub struct GuestViewControl {
    channel: Arc<Mutex<GuestChannel>>,
    view: Arc<GuestView>,
    asked: Mutex<Option<Asked>>,
}

impl GuestViewControl {
    /// The API's view of `channel`.
    pub fn new(channel: Arc<Mutex<GuestChannel>>) -> Self {
        let view = devices::bus::lock(&channel).view().clone();
        Self {
            channel,
            view,
            asked: Mutex::new(None),
        }
    }

    /// What the guest reported (for the API's wake-up: its change event).
    pub fn view(&self) -> &Arc<GuestView> {
        &self.view
    }

    /// Whether the guest's user space said it is ready.
    pub fn ready(&self) -> bool {
        self.view.ready()
    }

    /// Plugged bytes of `region` inside memory blocks the guest last reported online; `None`
    /// until the guest reports.
    pub fn online_size(&self, region: &HotplugRegion) -> Option<u64> {
        let report = self.view.report()?;
        let plugged: Vec<(u64, u64)> = region
            .plugged_ranges()
            .into_iter()
            .map(|(a, len)| (a.0, len))
            .collect();
        Some(report.online_bytes(&plugged))
    }

    /// The tag of a question asked at configuration generation `generation` (never 0: 0 is
    /// what a guest reports before its first question).
    fn tag(generation: u32) -> u64 {
        u64::from(generation) + 1
    }

    /// Whether the guest's last report was scanned after the memory last changed (configuration
    /// generation `generation`). Unless it is and `agrees` (it shows what the caller waits
    /// for), asks the guest for a new report: at most one question at a time, again
    /// [`ASK_AGAIN`] after an answer, or [`ASK_UNANSWERED`] after a question that got none.
    pub fn report_current(&self, generation: u32, agrees: bool) -> bool {
        let tag = Self::tag(generation);
        let reported = self.view.report_tag();
        let current = reported == Some(tag);
        if current && agrees {
            return true;
        }
        let mut asked = memory::lock(&self.asked);
        let due = match &*asked {
            None => true,
            Some(a) => {
                let answered = reported == Some(a.tag);
                let since = a.at.elapsed();
                (answered && (a.tag != tag || since >= ASK_AGAIN)) || since >= ASK_UNANSWERED
            }
        };
        if due && devices::bus::lock(&self.channel).query(tag) {
            *asked = Some(Asked {
                tag,
                at: Instant::now(),
            });
        }
        current
    }
}
