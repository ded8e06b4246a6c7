//! The soak's plot: resident memory, hit p99 and upstream requests per
//! second over time, one panel each, with a line where each fault started.

use std::path::Path;

use plotters::prelude::*;

use crate::soak::{Sample, SoakReport};

/// One panel: its title and the value of each sample.
type Panel = (&'static str, fn(&Sample) -> f64);

const PANELS: [Panel; 3] = [
    ("broker RSS (MiB)", |s| s.rss_bytes as f64 / 1048576.0),
    ("hit p99 (ms)", |s| f64::from(s.hit_p99_us) / 1000.0),
    (
        "upstream requests/s (mean; max in any second dashed)",
        |s| s.upstream_rps_mean,
    ),
];

/// A colour per fault, in the order the soak rotates through them.
const FAULT_COLOURS: [RGBColor; 5] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(44, 160, 44),
];

/// Draws `report` as an SVG at `path`.
pub fn draw(report: &SoakReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let minutes = |t: f64| t / 60.0;
    let end = report.samples.last().map_or(1.0, |s| minutes(s.t_secs));
    let fault_names: Vec<&str> = {
        let mut names: Vec<&str> = report.faults.iter().map(|f| f.name).collect();
        names.dedup();
        names.truncate(FAULT_COLOURS.len());
        names
    };
    let colour_of = |name: &str| {
        let index = fault_names.iter().position(|n| *n == name).unwrap_or(0);
        FAULT_COLOURS[index % FAULT_COLOURS.len()]
    };
    for (n, (area, (title, value))) in root.split_evenly((3, 1)).iter().zip(PANELS).enumerate() {
        let values: Vec<(f64, f64)> = report
            .samples
            .iter()
            .map(|s| (minutes(s.t_secs), value(s)))
            .collect();
        let maxima: Vec<(f64, f64)> = report
            .samples
            .iter()
            .map(|s| (minutes(s.t_secs), s.upstream_rps_max as f64))
            .collect();
        let top = values
            .iter()
            .chain(if n == 2 { &maxima[..] } else { &[] })
            .map(|(_, v)| *v)
            .fold(0.0, f64::max)
            .max(f64::EPSILON)
            * 1.25;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..end.max(0.1), 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .disable_x_mesh()
            .draw()?;
        let mut labelled = Vec::new();
        for fault in &report.faults {
            let t = minutes(fault.t_secs);
            let colour = colour_of(fault.name);
            let series = chart.draw_series(LineSeries::new(
                [(t, 0.0), (t, top)],
                colour.stroke_width(1),
            ))?;
            if n == 0 && !labelled.contains(&fault.name) {
                labelled.push(fault.name);
                series
                    .label(fault.name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour));
            }
        }
        chart.draw_series(LineSeries::new(values, BLUE.stroke_width(2)))?;
        if n == 2 {
            chart.draw_series(DashedLineSeries::new(maxima, 4, 3, BLUE.stroke_width(1)))?;
            let limit = f64::from(report.config.upstream_max_rps);
            chart
                .draw_series(LineSeries::new(
                    [(0.0, limit), (end, limit)],
                    BLACK.stroke_width(1),
                ))?
                .label("--upstream-max-rps")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
        }
        if n != 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}
