//! `report.html`: one self-contained page (inline SVG, no fetches) with
//! the summary, the checks and five charts drawn with plotters.

use std::collections::BTreeMap;
use std::fmt::Write;

use plotters::prelude::*;
use shoal_sim::model::{Action, Plan, Scenario};
use shoal_sim::node::core::node::LookupKind;
use shoal_sim::observe::{Fact, Outcome};
use shoal_sim::summary::Summary;

const WIDTH: u32 = 760;
const HEIGHT: u32 = 340;
/// Points per time series (keeps the page small for long runs).
const SAMPLES: usize = 240;
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Chart = Result<String, String>;

fn svg(draw: impl FnOnce(DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), String>) -> Chart {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(root.clone())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// One line series of a [`lines`] chart.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
}

/// A chart of line series with a legend.
fn lines(caption: &str, x: (f64, &str), y: (f64, &str), series: Vec<Series>) -> Chart {
    svg(|root| {
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..x.0, 0.0..y.0)
            .map_err(err)?;
        chart.configure_mesh().x_desc(x.1).y_desc(y.1).draw().map_err(err)?;
        for Series { name, points, color } in series {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(err)?;
        Ok(())
    })
}

/// Completion CDF against the lower bound.
fn completion_cdf(plan: &Plan, summary: &Summary, outcome: &Outcome) -> Chart {
    let asks: BTreeMap<(u32, u16), f64> =
        plan.gets.iter().map(|&(h, f, at)| ((h as u32, f as u16), at.as_secs_f64())).collect();
    let mut done: BTreeMap<(u32, u16), f64> = BTreeMap::new();
    for r in &outcome.records {
        if let Fact::DownloadCompleted { file } = r.fact
            && let Some(ask) = asks.get(&(r.host, file))
        {
            done.entry((r.host, file)).or_insert(r.at.as_secs_f64() - ask);
        }
    }
    let mut times: Vec<f64> = done.into_values().collect();
    times.sort_by(f64::total_cmp);
    let asked = asks.len().max(1) as f64;
    let bound = summary.lower_bound_s;
    let x_max = times.last().copied().unwrap_or(1.0).max(bound.unwrap_or(0.0)) * 1.05 + 0.1;
    let mut points = vec![(0.0, 0.0)];
    for (i, t) in times.iter().enumerate() {
        points.push((*t, i as f64 / asked));
        points.push((*t, (i + 1) as f64 / asked));
    }
    let mut series = vec![Series { name: "completed".into(), points, color: PALETTE[0] }];
    if let Some(b) = bound {
        series.push(Series {
            name: format!("Kumar-Ross bound {b:.2} s"),
            points: vec![(b, 0.0), (b, 1.0)],
            color: PALETTE[3],
        });
    }
    lines("Download completion (CDF, seconds after asking)", (x_max, "seconds"), (1.0, "fraction done"), series)
}

/// Cumulative verified pieces per host class over time.
fn pieces_by_class(scenario: &Scenario, plan: &Plan, outcome: &Outcome) -> Chart {
    let end = outcome.sim_time.as_secs_f64().max(0.001);
    let mut series: Vec<Vec<(f64, f64)>> = vec![vec![(0.0, 0.0)]; scenario.hosts.len()];
    let mut counts = vec![0.0; scenario.hosts.len()];
    for r in &outcome.records {
        if let Fact::PieceVerified { .. } = r.fact {
            let class = plan.hosts[r.host as usize].class;
            counts[class] += 1.0;
            series[class].push((r.at.as_secs_f64(), counts[class]));
        }
    }
    let y_max = counts.iter().copied().fold(1.0, f64::max) * 1.05;
    let series = scenario
        .hosts
        .iter()
        .enumerate()
        .map(|(i, class)| {
            let mut points = thin(&series[i]);
            points.push((end, counts[i]));
            Series { name: class.name.clone(), points, color: PALETTE[i % PALETTE.len()] }
        })
        .collect();
    lines("Pieces verified over time, by host class", (end, "simulated seconds"), (y_max, "pieces"), series)
}

/// Keep at most `SAMPLES` points of a step series, the last always.
fn thin(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= SAMPLES {
        return points.to_vec();
    }
    let step = points.len().div_ceil(SAMPLES);
    let mut out: Vec<(f64, f64)> = points.iter().step_by(step).copied().collect();
    if let Some(&last) = points.last() {
        out.push(last);
    }
    out
}

/// Minimum and mean replication of the first file's pieces over time
/// (seeders count from their share; crashes are not subtracted).
fn availability(plan: &Plan, outcome: &Outcome) -> Option<Chart> {
    let file = plan.files.first()?;
    let pieces = file.bytes.div_ceil(u64::from(file.piece_bytes)) as usize;
    // (time, +1 to one piece or to all).
    let mut changes: Vec<(f64, Option<usize>)> = plan
        .actions
        .iter()
        .filter(|(_, a)| matches!(a, Action::Share { file: 0, .. }))
        .map(|(at, _)| (at.as_secs_f64(), None))
        .collect();
    for r in &outcome.records {
        if let Fact::PieceVerified { file: 0, piece } = r.fact {
            changes.push((r.at.as_secs_f64(), Some(piece as usize)));
        }
    }
    changes.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut base = 0u64;
    let mut extra = vec![0u64; pieces];
    // Holders count histogram of `extra`, to track the minimum in O(1).
    let mut at_level: BTreeMap<u64, usize> = BTreeMap::from([(0, pieces)]);
    let (mut min_line, mut mean_line) = (Vec::new(), Vec::new());
    let mut total = 0u64;
    for (t, change) in changes {
        match change {
            None => base += 1,
            Some(p) if p < pieces => {
                let level = extra[p];
                if let Some(n) = at_level.get_mut(&level) {
                    *n -= 1;
                    if *n == 0 {
                        at_level.remove(&level);
                    }
                }
                extra[p] += 1;
                *at_level.entry(level + 1).or_insert(0) += 1;
                total += 1;
            }
            Some(_) => continue,
        }
        let min = base + at_level.keys().next().copied().unwrap_or(0);
        min_line.push((t, min as f64));
        mean_line.push((t, base as f64 + total as f64 / pieces.max(1) as f64));
    }
    let end = outcome.sim_time.as_secs_f64().max(0.001);
    let y_max = mean_line.last().map_or(1.0, |p| p.1).max(1.0) * 1.1;
    let series = vec![
        Series { name: "minimum".into(), points: thin(&min_line), color: PALETTE[0] },
        Series { name: "mean".into(), points: thin(&mean_line), color: PALETTE[1] },
    ];
    let caption = format!("Piece availability of {} (copies per piece)", file.name);
    Some(lines(&caption, (end, "simulated seconds"), (y_max, "copies"), series))
}

/// How many node lookups took each number of rounds.
fn lookup_rounds(outcome: &Outcome) -> Option<Chart> {
    let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
    for r in &outcome.records {
        if let Fact::Lookup { kind: LookupKind::FindNode, rounds, .. } = r.fact {
            *counts.entry(rounds).or_insert(0) += 1;
        }
    }
    let max_rounds = *counts.keys().last()?;
    let y_max = counts.values().copied().max().unwrap_or(1) + 1;
    Some(svg(|root| {
        let mut chart = ChartBuilder::on(&root)
            .caption("Node lookups by rounds", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d((0..max_rounds + 1).into_segmented(), 0..y_max)
            .map_err(err)?;
        chart.configure_mesh().x_desc("rounds").y_desc("lookups").draw().map_err(err)?;
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(PALETTE[0].filled())
                    .margin(6)
                    .data(counts.iter().map(|(&r, &n)| (r, n))),
            )
            .map_err(err)?;
        Ok(())
    }))
}

/// Bytes sent by frame kind.
fn bytes_by_kind(summary: &Summary) -> Chart {
    let kinds: Vec<(&String, u64)> = summary.bytes.by_kind.iter().map(|(k, v)| (k, *v)).collect();
    let y_max = kinds.iter().map(|k| k.1).max().unwrap_or(1).max(1) as f64 / 1e6 * 1.1;
    svg(|root| {
        let mut chart = ChartBuilder::on(&root)
            .caption("Bytes sent by message kind (MB)", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d((0..kinds.len()).into_segmented(), 0.0..y_max)
            .map_err(err)?;
        let names: Vec<String> = kinds.iter().map(|k| k.0.clone()).collect();
        chart
            .configure_mesh()
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc("MB")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(kinds.iter().enumerate().map(|(i, (_, bytes))| {
                let color = PALETTE[i % PALETTE.len()];
                Rectangle::new(
                    [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *bytes as f64 / 1e6)],
                    color.filled(),
                )
            }))
            .map_err(err)?;
        Ok(())
    })
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The whole page.
pub fn html(scenario: &Scenario, plan: &Plan, outcome: &Outcome, summary: &Summary) -> Result<String, String> {
    let mut charts = vec![completion_cdf(plan, summary, outcome)?, pieces_by_class(scenario, plan, outcome)?];
    if let Some(chart) = availability(plan, outcome) {
        charts.push(chart?);
    }
    if let Some(chart) = lookup_rounds(outcome) {
        charts.push(chart?);
    }
    charts.push(bytes_by_kind(summary)?);

    let mut page = String::new();
    let title = format!("{} — seed {} — {}", summary.scenario, summary.seed, summary.engine);
    let _ = write!(
        page,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:sans-serif;max-width:800px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}\
         .ok{{color:#2a7d2a}}.fail{{color:#c0392b;font-weight:bold}}svg{{margin:1em 0}}</style></head><body>\
         <h1>{t}</h1><p>{d}</p>",
        t = escape(&title),
        d = escape(&scenario.description)
    );
    let _ = write!(
        page,
        "<p class=\"{}\">{}</p><table><tr><th>check</th><th>result</th><th>detail</th></tr>",
        if summary.ok { "ok" } else { "fail" },
        if summary.ok { "All checks passed." } else { "Some checks failed." }
    );
    for check in &summary.checks {
        let _ = write!(
            page,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            escape(&check.name),
            if check.ok { "ok" } else { "fail" },
            if check.ok { "ok" } else { "FAILED" },
            escape(&check.detail)
        );
    }
    page.push_str("</table><table>");
    for (k, v) in crate::runner::summary_rows(summary) {
        let _ = write!(page, "<tr><th>{}</th><td>{}</td></tr>", escape(&k), escape(&v));
    }
    page.push_str("</table>");
    for chart in charts {
        page.push_str(&chart);
    }
    let _ = write!(page, "<p><small>trace {}</small></p></body></html>", summary.trace_hash);
    Ok(page)
}
