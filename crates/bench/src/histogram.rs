//! Latency histograms as SVG: one line per series, the share of its samples in each
//! of 60 buckets up to 1.2 × the largest p99 of all series.

use evmm_testhost::notify_output::Stats;
use plotters::prelude::*;
use std::path::Path;

const BUCKETS: usize = 60;

/// The share (%) of `samples` in each bucket of `width` below `hi`, as
/// (bucket centre, %) points.
pub fn buckets(samples: &[f64], hi: f64) -> Vec<(f64, f64)> {
    let width = hi / BUCKETS as f64;
    let mut counts = vec![0u64; BUCKETS];
    for &x in samples {
        if x >= 0.0 && x < hi {
            counts[((x / width) as usize).min(BUCKETS - 1)] += 1;
        }
    }
    let n = samples.len().max(1) as f64;
    counts
        .iter()
        .enumerate()
        .map(|(i, &c)| ((i as f64 + 0.5) * width, 100.0 * c as f64 / n))
        .collect()
}

/// Draws the histograms of `series` (name, latencies in µs) into `svg` under `caption`.
pub fn latency_svg(
    svg: &Path,
    caption: &str,
    series: &[(&str, Vec<f64>)],
) -> Result<(), Box<dyn std::error::Error>> {
    let hi = series
        .iter()
        .filter_map(|(_, v)| {
            Stats::of(&v.iter().map(|&x| x as u64).collect::<Vec<_>>()).map(|s| s.p99)
        })
        .fold(1.0, f64::max)
        * 1.2;
    let hists: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, v)| (*name, buckets(v, hi)))
        .collect();
    let ymax = hists
        .iter()
        .flat_map(|(_, h)| h.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(svg, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..hi, 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs)")
        .y_desc("% of requests")
        .draw()?;
    for (i, (name, h)) in hists.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(h.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_fall_in_their_buckets_and_the_rest_is_left_out() {
        // hi = 60: buckets of 1.
        let b = buckets(&[0.5, 0.7, 10.2, 59.9, 60.0, 1e9, -1.0], 60.0);
        assert_eq!(b.len(), BUCKETS);
        assert_eq!(b[0], (0.5, 100.0 * 2.0 / 7.0));
        assert_eq!(b[10].1, 100.0 / 7.0);
        assert_eq!(b[59].1, 100.0 / 7.0);
        let total: f64 = b.iter().map(|p| p.1).sum();
        assert!((total - 400.0 / 7.0).abs() < 1e-9);
    }

    #[test]
    fn an_svg_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("h.svg");
        latency_svg(&svg, "t", &[("a", vec![1.0, 2.0, 3.0]), ("b", vec![])]).unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    }
}
