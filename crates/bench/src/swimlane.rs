//! The swimlane picture of `evmm-notify-trace`: one panel per path, a median
//! request's stages as boxes in the lane of the thread that spends each of them,
//! with the stage's time written on it.

use plotters::prelude::*;
use std::path::Path;

/// The lanes, top to bottom.
const LANES: [&str; 6] = [
    "guest (vCPU)",
    "KVM (vCPU thread)",
    "consumer",
    "echo (tap's peer)",
    "kworker (irqfd)",
    "guest handler",
];

/// The lane a stage runs in (see [`crate::kick_stages`] for the names).
fn lane_of(stage: &str) -> usize {
    match stage {
        "store" => 0,
        "signal" => 1,
        "echo wakeup" | "echo" => 3,
        "inject" => 4,
        "deliver" => 5,
        _ => 2,
    }
}

/// One panel: a path's name and its median request's stages (name, µs).
pub struct Panel {
    /// The path.
    pub name: String,
    /// The stages in order, with their lengths in µs.
    pub stages: Vec<(&'static str, f64)>,
}

/// Draws `panels` into the SVG file `svg`.
pub fn draw(svg: &Path, panels: &[Panel]) -> Result<(), Box<dyn std::error::Error>> {
    let panel_h = 200;
    let height = (panel_h * panels.len().max(1)) as u32 + 20;
    let root = SVGBackend::new(svg, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let total: f64 = panel.stages.iter().map(|(_, us)| us).sum();
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{}: a median request, {total:.1} µs from the guest's kick to its handler",
                    panel.name
                ),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(25)
            .y_label_area_size(140)
            .build_cartesian_2d(0.0..total.max(1.0) * 1.02, -0.5..LANES.len() as f64 - 0.5)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .y_labels(LANES.len())
            .y_label_formatter(&|y| {
                (LANES.len())
                    .checked_sub(1 + y.round() as usize)
                    .and_then(|i| LANES.get(i))
                    .map_or(String::new(), |s| s.to_string())
            })
            .x_desc("µs since the guest's kick")
            .draw()?;
        let row = |lane: usize| (LANES.len() - 1 - lane) as f64;
        let mut x0 = 0.0;
        for (i, (stage, us)) in panel.stages.iter().enumerate() {
            let x1 = x0 + us;
            let lane = row(lane_of(stage));
            let color = Palette99::pick(i).mix(0.6);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, lane - 0.3), (x1.max(x0 + total * 0.003), lane + 0.3)],
                color.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{stage} {us:.1}"),
                (x0, lane + 0.42 - 0.25 * (i % 2) as f64),
                ("sans-serif", 12),
            )))?;
            if let Some((next, _)) = panel.stages.get(i + 1) {
                if lane_of(next) != lane_of(stage) {
                    chart.draw_series(std::iter::once(PathElement::new(
                        vec![(x1, lane), (x1, row(lane_of(next)))],
                        BLACK.stroke_width(1),
                    )))?;
                }
            }
            x0 = x1;
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_has_a_lane_and_the_picture_is_written() {
        use crate::kick_stages::{NET_STAGES, STAGES};
        assert_eq!(lane_of("store"), 0);
        assert_eq!(lane_of("echo"), 3);
        for s in STAGES.iter().chain(NET_STAGES.iter()) {
            assert!(lane_of(s) < LANES.len());
        }
        let dir = std::env::temp_dir().join(format!("evmm-swimlane-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("t.svg");
        let panel = Panel {
            name: "p".into(),
            stages: vec![("store", 10.0), ("signal", 1.0), ("deliver", 30.0)],
        };
        draw(&svg, &[panel]).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("signal 1.0"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
