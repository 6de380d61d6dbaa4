//! Section 5: the resize plot.

use super::*;

/// What one plotted line shows of a sample.
pub(crate) type Series = (&'static str, (u8, u8, u8), u32, fn(&Sample) -> u64);

pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) requested: u64,
    pub(crate) plugged: u64,
    pub(crate) resident: u64,
}

pub(crate) fn resize_trace(tide: &Path, seq: &[u64], out: &Path) -> Res<usize> {
    let dir = temp_dir("bench-resize");
    let sock = dir.as_path().join("api.sock");
    let vmm = Vmm::start_follow(tide, &sock, Kind::AnonThp, "8G")?;
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let sampler = {
        let (samples, stop, sock) = (samples.clone(), stop.clone(), sock.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let next = Instant::now() + Duration::from_millis(10);
                if let Ok(v) = get_mem(&sock) {
                    samples.lock().unwrap().push(Sample {
                        t: t0.elapsed().as_secs_f64(),
                        requested: u(&v, "requested_size"),
                        plugged: u(&v, "plugged_size"),
                        resident: u(&v, "resident_bytes"),
                    });
                }
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
    };
    let hold = Duration::from_millis(400);
    std::thread::sleep(hold);
    let mut res = Ok(());
    for &b in seq {
        if let Err(e) = patch(&sock, b).and_then(|_| settle(&sock, b)) {
            res = Err(e);
            break;
        }
        std::thread::sleep(hold);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    vmm.stop();
    res?;
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let mut csv = String::from("seconds,requested_bytes,plugged_bytes,resident_bytes\n");
    for s in &samples {
        let _ = writeln!(
            csv,
            "{:.4},{},{},{}",
            s.t, s.requested, s.plugged, s.resident
        );
    }
    std::fs::write(out.join("resize.csv"), csv).map_err(|e| format!("resize.csv: {e}"))?;
    draw(&samples, seq, &out.join("resize.png"))?;
    Ok(samples.len())
}

/// Registers a system TrueType font for plotters' `ab_glyph` text; false when none is found.
pub(crate) fn load_font() -> bool {
    const FONTS: &[&str] = &[
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    ];
    for f in FONTS {
        if let Ok(bytes) = std::fs::read(f) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                bytes,
            )
            .is_ok()
            {
                return true;
            }
        }
    }
    false
}

pub(crate) fn draw(samples: &[Sample], seq: &[u64], png: &Path) -> Res<()> {
    use plotters::prelude::*;
    let e = |e: &dyn std::fmt::Display| format!("resize.png: {e}");
    let font = load_font();
    if !font {
        println!("  note: no TrueType font found; resize.png has no labels");
    }
    let t_max = samples.last().map_or(1.0, |s| s.t).max(0.1);
    let y_max = samples
        .iter()
        .map(|s| s.plugged.max(s.resident).max(s.requested))
        .chain(seq.iter().copied())
        .max()
        .unwrap_or(GIB) as f64
        / MIB as f64
        * 1.08;
    let root = BitMapBackend::new(png, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if font {
        let steps: Vec<String> = std::iter::once("0".to_string())
            .chain(
                seq.iter()
                    .map(|&b| if b == 0 { "0".into() } else { size_str(b) }),
            )
            .collect();
        let caption = format!(
            "Tide, anon THP backend: requested {} (GET /hotplug/memory every ~10 ms)",
            steps.join(" -> ")
        );
        b.caption(caption, ("sans-serif", 22))
            .x_label_area_size(50)
            .y_label_area_size(80);
    }
    let mut chart = b
        .build_cartesian_2d(0.0..t_max * 1.02, 0.0..y_max)
        .map_err(|x| e(&x))?;
    if font {
        chart
            .configure_mesh()
            .x_desc("seconds since the first sample")
            .y_desc("MiB")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_label_formatter(&|x| format!("{x:.1}"))
            .label_style(("sans-serif", 18))
            .axis_desc_style(("sans-serif", 20))
            .draw()
            .map_err(|x| e(&x))?;
    }
    let series: [Series; 3] = [
        ("requested_size", (150, 150, 150), 2, |s| s.requested),
        ("plugged_size (guest)", (20, 90, 200), 3, |s| s.plugged),
        ("resident_bytes (host)", (220, 50, 30), 2, |s| s.resident),
    ];
    for (label, (r, g, b), width, f) in series {
        let color = RGBColor(r, g, b);
        let pts = samples
            .iter()
            .map(|s| (s.t, f(s) as f64 / MIB as f64))
            .collect::<Vec<_>>();
        let drawn = chart
            .draw_series(LineSeries::new(pts, color.stroke_width(width)))
            .map_err(|x| e(&x))?;
        if font {
            drawn.label(label).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3))
            });
        }
    }
    if font {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 18))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
