//! A hand-written SVG of the boot stages: per run, a horizontal bar split into stages
//! (linear time), then per stage a box plot of its time since the process start on a
//! log scale (so a 2 ms VMM setup and a 60 s emulated kernel boot both show).

use std::fmt::Write as _;

use super::super::stats::quantile;
use super::timeline::{BootStage, RunTimeline};

const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 190.0;
const PLOT_W: f64 = WIDTH - LABEL_W - 30.0;
const ROW_H: f64 = 18.0;
const BAR_H: f64 = 12.0;
/// Most runs drawn as bars per series (the box plots use every run).
const MAX_BARS: usize = 40;

/// One colour per stage, in `BootStage::ALL` order.
const COLOURS: [&str; 12] = [
    "#999999", "#7f7f7f", "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a",
    "#d62728", "#9467bd", "#8c564b", "#e377c2",
];

fn colour(stage: BootStage) -> &'static str {
    let i = BootStage::ALL.iter().position(|&s| s == stage).unwrap_or(0);
    COLOURS.get(i).copied().unwrap_or("#000000")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick label: up to three decimals, trailing zeros dropped.
fn tick(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// A value in ms: three decimals below 100 ms, one above.
fn value_label(v: f64) -> String {
    if v < 100.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1}")
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// A "nice" axis end at or above `max` (1, 2 or 5 times a power of ten).
fn nice_ceiling(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|&v| v >= max)
        .unwrap_or(10.0 * power)
}

/// Position on a log axis from `lo` to `hi` (ms), clamped into the plot.
fn log_x(value: f64, lo: f64, hi: f64) -> f64 {
    let v = value.clamp(lo, hi);
    LABEL_W + PLOT_W * (v.log10() - lo.log10()) / (hi.log10() - lo.log10())
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, body: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}">{}</text>"#,
        escape(body)
    );
}

/// A series' name, bold, above its rows.
fn series_header(out: &mut String, y: f64, name: &str) {
    let _ = writeln!(
        out,
        r#"<text x="20" y="{:.1}" font-weight="bold">{}</text>"#,
        y + BAR_H - 2.0,
        escape(name)
    );
}

/// The stacked bars: one row per run of each series, segments from the latest earlier
/// stage to each stage. Returns the height used.
fn bars(out: &mut String, top: f64, series: &[(&str, &[RunTimeline])]) -> f64 {
    let max = series
        .iter()
        .flat_map(|(_, runs)| runs.iter())
        .flat_map(|r| r.stages())
        .map(|(_, t)| ms(t))
        .fold(0.0, f64::max);
    let end = nice_ceiling(max);
    let scale = PLOT_W / end;
    let mut y = top;
    text(
        out,
        10.0,
        y + 12.0,
        "start",
        "Each boot, stage by stage (ms since process start)",
    );
    y += ROW_H * 1.5;
    for (name, runs) in series {
        series_header(out, y, name);
        y += ROW_H;
        for (i, run) in runs.iter().take(MAX_BARS).enumerate() {
            text(
                out,
                LABEL_W - 8.0,
                y + BAR_H - 2.0,
                "end",
                &format!("#{}", i + 1),
            );
            let mut last = 0u64;
            for (stage, t) in run.stages() {
                let from = last.min(t);
                let w = (ms(t) - ms(from)) * scale;
                if w > 0.0 {
                    let _ = writeln!(
                        out,
                        r#"<rect x="{:.2}" y="{y:.1}" width="{w:.2}" height="{BAR_H}" fill="{}"><title>{}: {:.3} ms (+{:.3})</title></rect>"#,
                        LABEL_W + ms(from) * scale,
                        colour(stage),
                        stage.name(),
                        ms(t),
                        ms(t) - ms(from)
                    );
                }
                last = last.max(t);
            }
            y += ROW_H;
        }
        if runs.len() > MAX_BARS {
            text(
                out,
                LABEL_W - 8.0,
                y + BAR_H - 2.0,
                "end",
                &format!("({} more runs not drawn)", runs.len() - MAX_BARS),
            );
            y += ROW_H;
        }
    }
    // Linear axis with five ticks.
    let _ = writeln!(
        out,
        r##"<line x1="{LABEL_W}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#333"/>"##,
        LABEL_W + PLOT_W
    );
    for k in 0..=5 {
        let v = end * f64::from(k) / 5.0;
        text(out, LABEL_W + v * scale, y + 14.0, "middle", &tick(v));
    }
    y + ROW_H * 1.5 - top
}

/// Per series and stage, a box plot (min, quartiles, median, max) of the time since the
/// process start on a log axis. Returns the height used.
fn boxes(out: &mut String, top: f64, series: &[(&str, &[RunTimeline])]) -> f64 {
    let values = |runs: &[RunTimeline], stage: BootStage| -> Vec<f64> {
        let mut v: Vec<f64> = runs.iter().filter_map(|r| r.get(stage)).map(ms).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, runs)| runs.iter().flat_map(|r| r.stages()))
        .filter(|&(s, _)| s != BootStage::Vmm(vmm::Stage::ProcessStart))
        .map(|(_, t)| ms(t))
        .filter(|&v| v > 0.0)
        .collect();
    let lo_raw = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi_raw = all.iter().copied().fold(0.0, f64::max);
    let lo = if lo_raw.is_finite() {
        10f64.powf(lo_raw.log10().floor())
    } else {
        0.1
    };
    let hi = 10f64.powf(hi_raw.max(lo * 10.0).log10().ceil());
    let mut y = top;
    text(
        out,
        10.0,
        y + 12.0,
        "start",
        "Per stage: min, quartiles, median, max (ms since process start, log scale)",
    );
    y += ROW_H * 1.5;
    for (name, runs) in series {
        series_header(out, y, name);
        y += ROW_H;
        for &stage in BootStage::ALL.iter().skip(1) {
            let v = values(runs, stage);
            let (Some(&min), Some(&max)) = (v.first(), v.last()) else {
                continue;
            };
            let (q1, med, q3) = (quantile(&v, 0.25), quantile(&v, 0.5), quantile(&v, 0.75));
            let mid = y + BAR_H / 2.0;
            text(out, LABEL_W - 8.0, y + BAR_H - 2.0, "end", stage.name());
            let _ = writeln!(
                out,
                r##"<line x1="{:.2}" y1="{mid:.1}" x2="{:.2}" y2="{mid:.1}" stroke="#333"/>"##,
                log_x(min, lo, hi),
                log_x(max, lo, hi)
            );
            let _ = writeln!(
                out,
                r##"<rect x="{:.2}" y="{y:.1}" width="{:.2}" height="{BAR_H}" fill="{}" stroke="#333"><title>{name}: {}: p50 {med:.3} ms, min {min:.3}, max {max:.3}, n={}</title></rect>"##,
                log_x(q1, lo, hi),
                (log_x(q3, lo, hi) - log_x(q1, lo, hi)).max(1.0),
                colour(stage),
                stage.name(),
                v.len()
            );
            let _ = writeln!(
                out,
                r##"<line x1="{x:.2}" y1="{y:.1}" x2="{x:.2}" y2="{:.1}" stroke="#000" stroke-width="2"/>"##,
                y + BAR_H,
                x = log_x(med, lo, hi)
            );
            text(
                out,
                log_x(max, lo, hi) + 4.0,
                y + BAR_H - 2.0,
                "start",
                &value_label(med),
            );
            y += ROW_H;
        }
        y += ROW_H / 2.0;
    }
    let _ = writeln!(
        out,
        r##"<line x1="{LABEL_W}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#333"/>"##,
        LABEL_W + PLOT_W
    );
    let (first, last) = (lo.log10().round() as i32, hi.log10().round() as i32);
    for power in first..=last {
        let decade = 10f64.powi(power);
        let x = log_x(decade, lo, hi);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{y:.1}" stroke="#ddd"/>"##
        );
        text(out, x, y + 14.0, "middle", &tick(decade));
    }
    y + ROW_H * 1.5 - top
}

/// The stage colours, wrapped onto as many rows as they need. Returns the height used.
fn legend(out: &mut String, top: f64) -> f64 {
    let (mut x, mut y) = (10.0, top);
    for &stage in BootStage::ALL.iter().skip(1) {
        let w = 14.0 + 7.0 * stage.name().len() as f64 + 12.0;
        if x + w > WIDTH {
            x = 10.0;
            y += ROW_H;
        }
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="{y:.1}" width="10" height="10" fill="{}"/>"#,
            colour(stage)
        );
        text(out, x + 14.0, y + 9.0, "start", stage.name());
        x += w;
    }
    y - top + ROW_H * 1.5
}

/// The whole SVG document for `series` (name, runs), under `title`.
pub fn render(title: &str, series: &[(&str, &[RunTimeline])]) -> String {
    let mut body = String::new();
    let mut y = 10.0;
    text(&mut body, 10.0, y + 14.0, "start", title);
    y += ROW_H * 1.8;
    y += legend(&mut body, y);
    y += bars(&mut body, y, series);
    y += boxes(&mut body, y, series);
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{:.0}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n",
        y + 10.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(entry_ms: u64, gone_ms: u64) -> RunTimeline {
        RunTimeline::host_only(
            0,
            &[
                (
                    BootStage::Vmm(vmm::Stage::FirstVcpuEntry),
                    entry_ms * 1_000_000,
                ),
                (BootStage::Vmm(vmm::Stage::VmGone), gone_ms * 1_000_000),
            ],
        )
    }

    #[test]
    fn the_document_is_svg_with_one_bar_segment_per_stage_and_run() {
        let runs = vec![run(2, 10), run(3, 12)];

        let svg = render("boot <test>", &[("mxc-vm", &runs)]);

        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("boot &lt;test&gt;"));
        assert_eq!(svg.matches("<title>first_vcpu_entry:").count(), 2);
        assert_eq!(svg.matches("<title>vm_gone:").count(), 2);
        assert_eq!(
            svg.matches("<title>mxc-vm: vm_gone: p50 10.000 ms").count(),
            1
        );
    }

    #[test]
    fn tags_balance() {
        let runs = vec![run(1, 5)];

        let svg = render("t", &[("a", &runs), ("b", &runs)]);

        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert_eq!(
            svg.matches("<title>").count(),
            svg.matches("</title></rect>").count()
        );
    }

    #[test]
    fn axis_ends_are_round_numbers() {
        let ends = [0.7, 3.0, 45.0, 61_000.0].map(nice_ceiling);

        assert_eq!(ends, [1.0, 5.0, 50.0, 100_000.0]);
    }

    #[test]
    fn ticks_drop_trailing_zeros() {
        let labels = [0.001, 0.1, 1.0, 2.5, 1000.0].map(tick);

        assert_eq!(labels, ["0.001", "0.1", "1", "2.5", "1000"]);
    }

    #[test]
    fn many_runs_are_capped_in_the_bars() {
        let runs: Vec<RunTimeline> = (0..MAX_BARS as u64 + 5).map(|i| run(1, 2 + i)).collect();

        let svg = render("t", &[("s", &runs)]);

        assert_eq!(svg.matches("<title>vm_gone:").count(), MAX_BARS);
        assert!(svg.contains("5 more runs not drawn"));
    }
}
