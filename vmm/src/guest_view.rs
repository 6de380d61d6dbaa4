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

#[cfg(test)]
mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use devices::legacy::EventFdTrigger;

    /// What the host has written to the guest's receive side so far.
    fn questions(channel: &Arc<Mutex<GuestChannel>>) -> String {
        let mut c = devices::bus::lock(channel);
        let mut out = String::new();
        let mut b = [0u8];
        // LSR bit 0: data ready.
        loop {
            c.read(5, &mut b);
            if b[0] & 1 == 0 {
                return out;
            }
            c.read(0, &mut b);
            out.push(b[0] as char);
        }
    }

    fn guest_says(channel: &Arc<Mutex<GuestChannel>>, line: &str) {
        let mut c = devices::bus::lock(channel);
        for b in line.bytes() {
            c.write(0, &[b]);
        }
    }

    #[test]
    fn asks_once_per_change_until_a_current_report_agrees() {
        let channel = Arc::new(Mutex::new(
            GuestChannel::new(EventFdTrigger::new().unwrap()).unwrap(),
        ));
        let g = GuestViewControl::new(channel.clone());
        // No report: asked, once while the question is unanswered.
        assert!(!g.report_current(5, false));
        assert!(!g.report_current(5, false));
        assert_eq!(questions(&channel), "6\n");
        // A report from before the question is not current.
        guest_says(&channel, "tide-online 0 8000000 .\n");
        assert!(!g.report_current(5, false));
        assert_eq!(questions(&channel), "");
        // The answer is current; it agrees: nothing more is asked.
        guest_says(&channel, "tide-online 6 8000000 32 .\n");
        assert!(g.report_current(5, true));
        assert_eq!(questions(&channel), "");
        // The memory changed: the answered report is stale and the guest is asked at once.
        assert!(!g.report_current(9, true));
        assert_eq!(questions(&channel), "10\n");
        assert!(g.ready());
    }
}
