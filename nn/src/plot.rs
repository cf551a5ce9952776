//! The loss and accuracy curves of a run as a PNG (plotters' bitmap backend; text drawn with ab_glyph from
//! the DejaVu Sans font shipped in `assets/fonts`, so no system font library is needed).

use std::path::Path;
use std::sync::Once;

use engine::{Error, Result};
use plotters::prelude::*;

use crate::trainer::EpochMetrics;

/// One curve: its legend and its (epoch, value) points.
type Curve = (&'static str, Vec<(f64, f64)>);

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| Error::Msg { context: "plot", msg: "the bundled font could not be read".into() });
    });
    result
}

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Msg { context: "plot", msg: format!("{}: {e}", path.display()) }
}

/// Draws train/test loss (left) and accuracy (right) per epoch into `path` (PNG, 1200 x 450).
pub fn plot_metrics(path: &Path, metrics: &[EpochMetrics]) -> Result<()> {
    register_font()?;
    if metrics.is_empty() {
        return Err(err(path, "no epochs to plot"));
    }
    let root = BitMapBackend::new(path, (1200, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let (left, right) = root.split_horizontally(600);
    let epochs = metrics.last().map_or(1, |m| m.epoch).max(2) as f64;
    let series = |f: fn(&EpochMetrics) -> f64| metrics.iter().map(move |m| (m.epoch as f64, f(m))).collect::<Vec<_>>();
    let panels = [
        (&left, "loss", [("train", series(|m| m.train_loss)), ("test", series(|m| m.test_loss))] as [Curve; 2]),
        (&right, "accuracy", [("train", series(|m| m.train_acc)), ("test", series(|m| m.test_acc))]),
    ];
    for (area, title, lines) in panels {
        let (lo, hi) = lines
            .iter()
            .flat_map(|(_, v)| v.iter().map(|p| p.1))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(1.0..epochs, (lo - pad)..(hi + pad))
            .map_err(|e| err(path, e))?;
        chart.configure_mesh().x_desc("epoch").label_style(("sans-serif", 14)).draw().map_err(|e| err(path, e))?;
        for ((name, points), color) in lines.into_iter().zip([BLUE, RED]) {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| err(path, e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(path, e))?;
    }
    root.present().map_err(|e| err(path, e))
}
