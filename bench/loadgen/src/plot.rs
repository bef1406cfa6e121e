//! The soak's PNG: server and app RSS against runs completed.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// Registers DejaVu Sans (or another system TTF) for labels; without one the plot is drawn
/// without text rather than not at all.
fn font() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        ];
        for c in candidates {
            if let Ok(bytes) = std::fs::read(c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// `series`: (runs, server RSS MiB, app RSS MiB).
pub fn soak_png(path: &Path, series: &[(f64, f64, f64)], warmup: f64, title: &str) -> Result<()> {
    let labels = font();
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let xmax = series.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = series
        .iter()
        .flat_map(|p| [p.1, p.2])
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.15;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if labels {
        b.caption(title, ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(65);
    } else {
        b.x_label_area_size(10).y_label_area_size(10);
    }
    let mut chart = b
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| anyhow!("{e}"))?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("runs completed")
            .y_desc("RSS (MiB)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    // Warm-up boundary: the slope is fitted to the right of it.
    chart
        .draw_series(LineSeries::new(
            [(warmup, 0.0), (warmup, ymax)],
            RGBColor(90, 90, 90).stroke_width(2),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    let server = chart
        .draw_series(LineSeries::new(
            series.iter().map(|p| (p.0, p.1)),
            RED.stroke_width(2),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    if labels {
        server
            .label("cairn server RSS")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    let app = chart
        .draw_series(LineSeries::new(
            series.iter().map(|p| (p.0, p.2)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    if labels {
        app.label("Rust SDK app RSS")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
