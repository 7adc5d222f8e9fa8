//! `esft-train plot`: the ESFT paper's pictures as SVG, drawn with `plotters`, plus the
//! routing statistics of [`crate::routing_stats`] as JSON and Markdown.
//!
//! - `routing_heatmap.svg` (the paper's Figure 2): one panel per MoE layer, rows = tasks,
//!   columns = routed experts, colour = the task's score for the expert;
//! - `selected_experts.svg` (Figure 4): selected experts per layer, one bar series per task;
//! - `routing_summary.json` / `routing_summary.md`: top-expert shares and overlaps.
//!
//! This module owns reading the named inputs, the layout and the drawing; the numbers are
//! the inputs' own or routing_stats'. Only plotters' SVG backend is used: SVG text is
//! drawn by the viewer, so no font file is read and the command works on a bare machine.

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, KeyPointWeight};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use esft::adapter::ExpertConfig;

use crate::routing_stats;
use crate::score::{LayerScores, Scores};
use crate::select::ScoreFunction;

pub const HEATMAP_FILE: &str = "routing_heatmap.svg";
pub const SELECTED_FILE: &str = "selected_experts.svg";
pub const SUMMARY_JSON: &str = "routing_summary.json";
pub const SUMMARY_MD: &str = "routing_summary.md";

const FONT: &str = "sans-serif";

/// A `NAME=FILE` argument: a task label and its input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub name: String,
    pub path: PathBuf,
}

/// Parses `NAME=FILE` (the first `=` splits, so a path may hold `=`).
pub fn parse_named(s: &str) -> Result<Named, String> {
    let Some((name, path)) = s.split_once('=') else {
        return Err(format!(
            "expected NAME=FILE (a task label, '=', a path), got {s:?}"
        ));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{s:?}: the task label before '=' is empty"));
    }
    if path.is_empty() {
        return Err(format!("{s:?}: the file after '=' is empty"));
    }
    Ok(Named {
        name: name.to_string(),
        path: PathBuf::from(path),
    })
}

pub struct PlotRequest<'a> {
    pub scores: &'a [Named],
    pub configs: &'a [Named],
    pub out: &'a Path,
    pub function: ScoreFunction,
    pub top_fraction: f64,
}

/// Reads every input, checks them all, then writes the outputs; returns their paths.
pub fn plot(req: &PlotRequest) -> Result<Vec<PathBuf>> {
    if req.scores.is_empty() {
        bail!("give at least one --scores NAME=FILE");
    }
    let tasks: Vec<(String, Scores)> = req
        .scores
        .iter()
        .map(|n| {
            Scores::read(&n.path)
                .with_context(|| format!("--scores {}={}", n.name, n.path.display()))
                .map(|s| (n.name.clone(), s))
        })
        .collect::<Result<_>>()?;
    // Checks names, shapes and the fraction before anything is drawn.
    let summary = routing_stats::summarize(&tasks, req.function, req.top_fraction)?;

    let mut configs: Vec<(String, ExpertConfig)> = Vec::new();
    for n in req.configs {
        if configs.iter().any(|(c, _)| *c == n.name) {
            bail!("--configs: task name {:?} is given twice", n.name);
        }
        let cfg = crate::select::read_expert_config(&n.path)
            .with_context(|| format!("--configs {}={}", n.name, n.path.display()))?;
        configs.push((n.name.clone(), cfg));
    }

    std::fs::create_dir_all(req.out)
        .with_context(|| format!("creating the output directory {}", req.out.display()))?;
    let mut written = Vec::new();
    let mut write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = req.out.join(name);
        esft::util::write_atomic(&path, bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };

    let tables: Vec<(&str, &LayerScores)> = tasks
        .iter()
        .map(|(n, s)| (n.as_str(), routing_stats::table(s, req.function)))
        .collect();
    write(
        HEATMAP_FILE,
        routing_heatmap(&tables, req.function)?.as_bytes(),
    )?;
    if !configs.is_empty() {
        let refs: Vec<(&str, &ExpertConfig)> =
            configs.iter().map(|(n, c)| (n.as_str(), c)).collect();
        write(SELECTED_FILE, selected_experts(&refs)?.as_bytes())?;
    }
    let mut json = serde_json::to_string_pretty(&summary)?;
    json.push('\n');
    write(SUMMARY_JSON, json.as_bytes())?;
    write(SUMMARY_MD, summary.to_markdown().as_bytes())?;
    Ok(written)
}

/// A linear axis labelled exactly at `ticks`: rows, experts and layers sit at whole
/// numbers and want a label each (or every few), where plotters' own f64 axis picks
/// "nice" numbers, and its key-point wrapper cannot take a label formatter.
#[derive(Clone)]
struct TickedAxis {
    range: Range<f64>,
    ticks: Vec<f64>,
}

fn ticked(range: Range<f64>, ticks: Vec<f64>) -> TickedAxis {
    TickedAxis { range, ticks }
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let span = self.range.end - self.range.start;
        if span == 0.0 {
            return (limit.0 + limit.1) / 2;
        }
        let f = (v - self.range.start) / span;
        limit.0 + (f * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Labels and bold grid lines take the ticks; no light lines between them.
        match hint.weight() {
            KeyPointWeight::Bold => self.ticks.clone(),
            KeyPointWeight::Any => Vec::new(),
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

/// plotters' errors carry the backend's error type; anyhow wants one that is `'static`.
fn drawing<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T> {
    r.map_err(|e| anyhow!("drawing the plot: {e}"))
}

/// Matplotlib's tab10: distinct series colours that stay apart in print.
const SERIES: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The "Blues" sequential scale: low scores pale, so the few experts a task relies on stand
/// out dark against the rest, in colour or grey.
const BLUES: [(f64, f64, f64); 5] = [
    (247.0, 251.0, 255.0),
    (198.0, 219.0, 239.0),
    (107.0, 174.0, 214.0),
    (33.0, 113.0, 181.0),
    (8.0, 48.0, 107.0),
];

/// The colour of `v` in `0..=max`.
fn heat(v: f64, max: f64) -> RGBColor {
    let x = if max > 0.0 {
        (v / max).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = x * (BLUES.len() - 1) as f64;
    let i = (pos.floor() as usize).min(BLUES.len() - 2);
    let f = pos - i as f64;
    let (a, b) = (BLUES[i], BLUES[i + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round().clamp(0.0, 255.0) as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A generous width for `text` at `size` px: plotters' font-free layout estimate is
/// narrower than real sans-serif text, and a clipped task name is worse than a wide margin.
fn text_width(text: &str, size: u32) -> u32 {
    (text.chars().count() as f64 * size as f64 * 0.58).ceil() as u32
}

/// Whole numbers from `0` to `max` in steps that give at most about `ticks` labels.
fn int_ticks(max: usize, ticks: usize) -> Vec<f64> {
    let step = max.div_ceil(ticks.max(1)).max(1);
    (0..=max).step_by(step).map(|v| v as f64).collect()
}

fn format_score(v: f64, function: ScoreFunction) -> String {
    match function {
        ScoreFunction::Token => format!("{:.1}%", 100.0 * v),
        ScoreFunction::Gate => format!("{v:.3}"),
    }
}

/// Figure 2: routing heat maps of several tasks, one panel per layer. The tasks must share
/// layers and experts (routing_stats::check_same_shape).
pub fn routing_heatmap(tasks: &[(&str, &LayerScores)], function: ScoreFunction) -> Result<String> {
    let (layers, experts) = routing_stats::check_same_shape(tasks)?;
    let n_tasks = tasks.len();
    let n_experts = experts.len();
    let n_layers = layers.len();
    let max = tasks
        .iter()
        .flat_map(|(_, t)| t.values().flat_map(|l| l.values().copied()))
        .fold(0.0f64, f64::max);

    let cell_w = (512 / n_experts as u32).clamp(3, 14);
    let row_h = 16u32;
    let name_w = tasks
        .iter()
        .map(|(n, _)| text_width(n, 11))
        .max()
        .unwrap_or(0)
        + 14;
    let panel_w = name_w + cell_w * n_experts as u32 + 24;
    let panel_h = 26 + row_h * n_tasks as u32 + 26;
    let (title_h, legend_w) = (44u32, 150u32);
    let size = |cols: usize| {
        let rows = n_layers.div_ceil(cols) as u32;
        (
            cols as u32 * panel_w + legend_w,
            title_h + rows * panel_h + 12,
        )
    };
    // The panel grid whose picture is closest to a landscape page (width = 1.4 height), so
    // it stays legible when fitted into a report.
    let cols = (1..=4.min(n_layers.max(1)))
        .min_by(|&a, &b| {
            let off = |c: usize| {
                let (w, h) = size(c);
                (w as f64 / h as f64 / 1.4).ln().abs()
            };
            off(a).total_cmp(&off(b))
        })
        .unwrap_or(1);
    let rows = n_layers.div_ceil(cols);
    let (width, height) = size(cols);

    let what = match function {
        ScoreFunction::Token => "token selection ratio",
        ScoreFunction::Gate => "average gate score",
    };
    let title = format!("Expert routing per layer ({what}); rows: tasks, columns: routed experts");
    let x_ticks = {
        // Label about 8 experts per panel, at round ids.
        let step = [1, 2, 4, 8, 16, 32, 64, 128]
            .into_iter()
            .find(|s| n_experts / s <= 8)
            .unwrap_or(n_experts.max(1));
        let mut t: Vec<f64> = (0..n_experts).step_by(step).map(|i| i as f64).collect();
        if n_experts > 1 && (n_experts - 1) % step != 0 {
            t.push((n_experts - 1) as f64);
        }
        t
    };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        drawing(root.fill(&WHITE))?;
        let (head, body) = root.split_vertically(title_h);
        drawing(head.draw(&Text::new(
            title,
            (14, 14),
            (FONT, 17).into_font().color(&BLACK),
        )))?;
        let (grid, legend) = body.split_horizontally(cols as u32 * panel_w);
        let panels = grid.split_evenly((rows, cols));
        for (i, &layer) in layers.iter().enumerate() {
            let Some(area) = panels.get(i) else { break };
            let mut chart = drawing(
                ChartBuilder::on(area)
                    .caption(format!("layer {layer}"), (FONT, 13))
                    .margin(4)
                    .margin_right(14)
                    .x_label_area_size(18)
                    .y_label_area_size(name_w)
                    .build_cartesian_2d(
                        ticked(-0.5..n_experts as f64 - 0.5, x_ticks.clone()),
                        ticked(
                            -0.5..n_tasks as f64 - 0.5,
                            (0..n_tasks).map(|t| t as f64).collect(),
                        ),
                    ),
            )?;
            // Task 0 on top, as the tasks were given.
            let row_name = |y: &f64| -> String {
                let r = y.round();
                if (y - r).abs() > 1e-6 || r < 0.0 || r as usize >= n_tasks {
                    return String::new();
                }
                tasks[n_tasks - 1 - r as usize].0.to_string()
            };
            let expert_id = |x: &f64| -> String {
                experts
                    .get(x.round().max(0.0) as usize)
                    .map_or_else(String::new, |e| e.to_string())
            };
            drawing(
                chart
                    .configure_mesh()
                    .disable_mesh()
                    .x_label_formatter(&expert_id)
                    .y_label_formatter(&row_name)
                    .x_label_style((FONT, 10))
                    .y_label_style((FONT, 11))
                    .draw(),
            )?;
            let mut cells = Vec::with_capacity(n_tasks * n_experts);
            for (t, (_, table)) in tasks.iter().enumerate() {
                let y = (n_tasks - 1 - t) as f64;
                let Some(scores) = table.get(&layer) else {
                    continue;
                };
                for (x, e) in experts.iter().enumerate() {
                    let v = scores.get(e).copied().unwrap_or(0.0);
                    let x = x as f64;
                    cells.push(Rectangle::new(
                        [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                        heat(v, max).filled(),
                    ));
                }
            }
            drawing(chart.draw_series(cells))?;
        }
        color_bar(&legend, max, function, what)?;
        drawing(root.present())?;
    }
    Ok(svg)
}

/// The heat map's colour scale: a vertical bar from 0 to `max` with labelled ticks.
fn color_bar(
    area: &DrawingArea<SVGBackend, Shift>,
    max: f64,
    function: ScoreFunction,
    what: &str,
) -> Result<()> {
    let (_, h) = area.dim_in_pixel();
    let (bar, _) = area.split_vertically(h.min(340));
    let top = if max > 0.0 { max } else { 1.0 };
    let mut chart = drawing(
        ChartBuilder::on(&bar)
            .caption(what, (FONT, 11))
            .margin(10)
            .margin_left(8)
            .set_label_area_size(LabelAreaPosition::Right, 50)
            .build_cartesian_2d(0.0..1.0, 0.0..top),
    )?;
    let fmt = |v: &f64| format_score(*v, function);
    drawing(
        chart
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_formatter(&fmt)
            .y_label_style((FONT, 10))
            .draw(),
    )?;
    let steps = 100;
    drawing(chart.draw_series((0..steps).map(|i| {
        let (a, b) = (
            top * i as f64 / steps as f64,
            top * (i + 1) as f64 / steps as f64,
        );
        Rectangle::new([(0.0, a), (1.0, b)], heat((a + b) / 2.0, top).filled())
    })))?;
    Ok(())
}

/// Figure 4: the number of selected experts per layer, one bar series per task. Layers a
/// config does not list count 0 for it.
pub fn selected_experts(configs: &[(&str, &ExpertConfig)]) -> Result<String> {
    if configs.is_empty() {
        bail!("no expert configs given");
    }
    let layers: Vec<usize> = configs
        .iter()
        .flat_map(|(_, c)| c.experts.keys().copied())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if layers.is_empty() {
        bail!("the expert configs list no layers");
    }
    // Counted as sets: an id listed twice is still one expert.
    let counts: Vec<BTreeMap<usize, usize>> = configs
        .iter()
        .map(|(_, c)| {
            c.experts
                .iter()
                .map(|(&l, ids)| (l, ids.iter().collect::<BTreeSet<_>>().len()))
                .collect()
        })
        .collect();
    let max = counts
        .iter()
        .flat_map(|c| c.values().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let n_layers = layers.len();
    let n_tasks = configs.len();

    let labels: Vec<String> = configs
        .iter()
        .zip(&counts)
        .map(|((name, _), c)| {
            let total: usize = c.values().sum();
            format!(
                "{name} ({total} experts, {:.1} per layer)",
                total as f64 / n_layers as f64
            )
        })
        .collect();
    let legend_w = labels.iter().map(|l| text_width(l, 12)).max().unwrap_or(0) + 40;
    let plot_w = (n_layers as u32 * (n_tasks as u32 * 9 + 10) + 90).max(620);
    let (width, height) = (plot_w + legend_w, 440u32);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        drawing(root.fill(&WHITE))?;
        let (plot_area, legend) = root.split_horizontally(plot_w);
        let y_top = max as f64 + 0.5;
        let mut chart = drawing(
            ChartBuilder::on(&plot_area)
                .caption("Selected experts per layer", (FONT, 18))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(52)
                .build_cartesian_2d(
                    ticked(
                        -0.5..n_layers as f64 - 0.5,
                        (0..n_layers).map(|i| i as f64).collect(),
                    ),
                    ticked(0.0..y_top, int_ticks(max, 10)),
                ),
        )?;
        let layer_label = |x: &f64| -> String {
            layers
                .get(x.round().max(0.0) as usize)
                .map_or_else(String::new, |l| l.to_string())
        };
        let count_label = |y: &f64| format!("{}", y.round() as i64);
        drawing(
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_label_formatter(&layer_label)
                .y_label_formatter(&count_label)
                .x_desc("layer")
                .y_desc("selected experts")
                .label_style((FONT, 11))
                .axis_desc_style((FONT, 13))
                .draw(),
        )?;
        let group = 0.8;
        let bar_w = group / n_tasks as f64;
        for (t, c) in counts.iter().enumerate() {
            let color = SERIES[t % SERIES.len()];
            drawing(chart.draw_series(layers.iter().enumerate().map(|(i, l)| {
                let x0 = i as f64 - group / 2.0 + t as f64 * bar_w;
                let n = c.get(l).copied().unwrap_or(0) as f64;
                Rectangle::new([(x0, 0.0), (x0 + bar_w, n)], color.filled())
            })))?;
        }
        // The legend sits beside the plot so it never hides a bar.
        for (t, label) in labels.iter().enumerate() {
            let y = 60 + 22 * t as i32;
            let color = SERIES[t % SERIES.len()];
            drawing(legend.draw(&Rectangle::new([(8, y), (22, y + 14)], color.filled())))?;
            drawing(legend.draw(&Text::new(
                label.clone(),
                (30, y + 1),
                (FONT, 12).into_font().color(&BLACK),
            )))?;
        }
        drawing(root.present())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_arguments_parse_or_say_why_not() {
        assert_eq!(
            parse_named("law=a/b=c.json").unwrap(),
            Named {
                name: "law".into(),
                path: "a/b=c.json".into()
            }
        );
        assert!(parse_named("law.json").unwrap_err().contains("NAME=FILE"));
        assert!(parse_named("=x.json").unwrap_err().contains("label"));
        assert!(parse_named("law=").unwrap_err().contains("file"));
    }

    #[test]
    fn heat_runs_from_pale_to_dark() {
        assert_eq!(heat(0.0, 1.0), RGBColor(247, 251, 255));
        assert_eq!(heat(1.0, 1.0), RGBColor(8, 48, 107));
        assert_eq!(heat(5.0, 1.0), RGBColor(8, 48, 107));
        assert_eq!(heat(0.3, 0.0), RGBColor(247, 251, 255));
    }

    #[test]
    fn int_ticks_stay_whole_and_few() {
        assert_eq!(int_ticks(6, 10), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            int_ticks(30, 10),
            (0..=10).map(|v| 3.0 * v as f64).collect::<Vec<_>>()
        );
    }
}
