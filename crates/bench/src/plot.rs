//! Charts of a comparison, each written as PNG and SVG: a figure is a grid of line
//! panels, one line per topology in a colour that stays the same across figures.
//! Text is drawn with the DejaVu Sans font bundled in the binary, so PNGs render the
//! same on machines without fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Pixel size of one panel.
const PANEL: (u32, u32) = (640, 420);
const FONT: &str = "sans-serif";
/// Lines with more points than this are drawn without markers.
const MAX_MARKED_POINTS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

/// One line.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart in a figure.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// Panels in a grid under a title.
#[derive(Debug, Clone)]
pub struct Figure {
    pub title: String,
    pub columns: usize,
    pub panels: Vec<Panel>,
}

/// Line colours, by the series' position among the topologies.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only for malformed font bytes; the bundled font is well-formed.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

impl Figure {
    /// Writes `dir/stem.png` and `dir/stem.svg`.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, PlotError> {
        register_font();
        let columns = self.columns.max(1);
        let rows = self.panels.len().div_ceil(columns).max(1);
        let size = (PANEL.0 * columns as u32, PANEL.1 * rows as u32 + 40);
        let png = dir.join(format!("{stem}.png"));
        let svg = dir.join(format!("{stem}.svg"));
        let failed = |path: &Path| {
            let path = path.to_path_buf();
            move |message: String| PlotError::Draw { path, message }
        };
        self.draw(BitMapBackend::new(&png, size).into_drawing_area(), rows)
            .map_err(failed(&png))?;
        self.draw(SVGBackend::new(&svg, size).into_drawing_area(), rows)
            .map_err(failed(&svg))?;
        Ok(vec![png, svg])
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, Shift>,
        rows: usize,
    ) -> Result<(), String> {
        let text = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(text)?;
        let root = root
            .titled(&self.title, (FONT, 24))
            .map_err(|e| e.to_string())?;
        let areas = root.split_evenly((rows, self.columns.max(1)));
        for (panel, area) in self.panels.iter().zip(areas.iter()) {
            panel.draw(area)?;
        }
        root.present().map_err(text)?;
        Ok(())
    }
}

impl Panel {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let error = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        let (x_range, y_range) = self.ranges();
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, (FONT, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x_range, y_range)
            .map_err(error)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_label_formatter(&|x| tick(*x))
            .y_label_formatter(&|y| tick(*y))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(WHITE)
            .draw()
            .map_err(error)?;
        for (i, series) in self.series.iter().enumerate() {
            let points: Vec<(f64, f64)> = series
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            let colour = COLOURS[i % COLOURS.len()];
            let style = ShapeStyle::from(&colour).stroke_width(2);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), style))
                .map_err(error)?
                .label(&series.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            // Markers show a sweep's few measured points; on a dense line they only blot.
            if points.len() <= MAX_MARKED_POINTS {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                    .map_err(error)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(error)?;
        Ok(())
    }

    /// Axis ranges covering every point with a margin; y starts at 0.
    fn ranges(&self) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x_min, mut x_max, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
        for &(x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
            x_min = x_min.min(x);
            x_max = x_max.max(x);
            y_max = y_max.max(y);
        }
        if !x_min.is_finite() {
            (x_min, x_max) = (0.0, 1.0);
        }
        let x_pad = ((x_max - x_min) * 0.05).max(0.5);
        let y_top = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
        (x_min - x_pad..x_max + x_pad, 0.0..y_top)
    }
}

/// "4" for 4.0, "0.5" for 0.5, "12.3" for 12.34: no trailing ".0" on whole ticks.
fn tick(value: f64) -> String {
    if value.fract().abs() < 1e-9 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else if value.abs() >= 0.1 {
        format!("{value:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    } else {
        // Small values (seconds per token) keep their first significant digits.
        format!("{value:.4}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_is_written_as_png_and_svg() {
        let dir = tempfile_dir();
        let panel = |title: &str| Panel {
            title: title.into(),
            x_label: "concurrency".into(),
            y_label: "output tok/s".into(),
            series: vec![
                Series {
                    name: "single".into(),
                    points: vec![(1.0, 10.0), (2.0, 18.0), (4.0, 30.0)],
                },
                Series {
                    name: "disaggregated".into(),
                    points: vec![(1.0, 9.0), (2.0, 19.0), (4.0, f64::NAN)],
                },
            ],
        };
        let figure = Figure {
            title: "Throughput".into(),
            columns: 2,
            panels: vec![panel("a"), panel("b"), panel("c")],
        };
        let files = figure.save(&dir, "throughput").unwrap();
        let png = std::fs::read(&files[0]).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let svg = std::fs::read_to_string(&files[1]).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("disaggregated"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
