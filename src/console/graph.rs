//! The Workflow page: the cards and the rule table drawn as a graph (an SVG made here), each
//! edge labelled with how many tasks took it in the last hour.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};

use super::html::{esc, page};
use super::{failed, Console};
use crate::envelope::now_ms;
use crate::rules::{Action, Kind, RuleTable};

/// The edges the rule table allows: from `start` (submissions) or a card, to a card or `done`,
/// each with the rules that make it.
pub fn rule_edges(rules: &RuleTable) -> BTreeMap<(String, String), Vec<String>> {
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for rule in &rules.rules {
        let sources: Vec<String> = if !rule.when.source.is_empty() {
            rule.when.source.clone()
        } else if !rule.when.join.is_empty() {
            rule.when.join.clone()
        } else if rule.when.kinds().contains(&Kind::Submitted) {
            vec!["start".into()]
        } else {
            vec!["any".into()]
        };
        let mut targets: Vec<String> = rule.then.targets().iter().map(|t| t.to_string()).collect();
        if matches!(rule.then, Action::Complete) {
            targets.push("done".into());
        }
        for source in &sources {
            for target in &targets {
                edges
                    .entry((source.clone(), target.clone()))
                    .or_default()
                    .push(rule.id.clone());
            }
        }
    }
    edges
}

/// Columns by distance from `start`; nodes not reached go in a last column.
fn layers(nodes: &BTreeSet<String>, edges: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut depth = BTreeMap::from([("start".to_string(), 0usize)]);
    let mut frontier = vec!["start".to_string()];
    while let Some(node) = frontier.pop() {
        let d = depth[&node];
        for (_, target) in edges.iter().filter(|(s, _)| *s == node) {
            if !depth.contains_key(target) && d < nodes.len() {
                depth.insert(target.clone(), d + 1);
                frontier.insert(0, target.clone());
            }
        }
    }
    let last = depth.values().max().copied().unwrap_or(0) + 1;
    nodes
        .iter()
        .map(|n| (n.clone(), depth.get(n).copied().unwrap_or(last)))
        .collect()
}

/// The SVG of `edges` (with their counts) between `nodes`.
pub fn svg(nodes: &BTreeSet<String>, edges: &[(String, String, i64)]) -> String {
    let pairs: Vec<(String, String)> = edges
        .iter()
        .map(|(s, t, _)| (s.clone(), t.clone()))
        .collect();
    let column = layers(nodes, &pairs);
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    let mut at = BTreeMap::new();
    for (node, c) in &column {
        let r = rows.entry(*c).or_default();
        at.insert(node.clone(), (40 + *c as i64 * 200, 40 + *r as i64 * 70));
        *r += 1;
    }
    let width = 200 * (column.values().max().copied().unwrap_or(0) as i64 + 1) + 80;
    let height = 70 * rows.values().max().copied().unwrap_or(1) as i64 + 40;
    let mut out = format!(
        "<svg id=\"graph\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" width=\"100%\" style=\"max-width:{width}px\" font-size=\"12\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"6\" markerHeight=\"6\" orient=\"auto\">\
         <path d=\"M0,0 L10,5 L0,10 z\" fill=\"#6b7785\"/></marker></defs>"
    );
    for (source, target, count) in edges {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (at.get(source), at.get(target)) else {
            continue;
        };
        let (x1, y1, x2, y2) = (x1 + 140, y1 + 15, x2, y2 + 15);
        let bend = if x2 <= x1 { 60 } else { 0 };
        let _ = write!(
            out,
            "<g class=\"edge\" data-source=\"{s}\" data-target=\"{t}\" data-count=\"{count}\">\
             <path d=\"M{x1},{y1} C{c1},{y1b} {c2},{y2b} {x2},{y2}\" fill=\"none\" stroke=\"#6b7785\" marker-end=\"url(#arrow)\"/>\
             <text x=\"{tx}\" y=\"{ty}\" fill=\"#4b84d6\">{count}</text></g>",
            s = esc(source),
            t = esc(target),
            c1 = x1 + 30,
            c2 = x2 - 30,
            y1b = y1 + bend,
            y2b = y2 + bend,
            tx = (x1 + x2) / 2,
            ty = (y1 + y2) / 2 - 4 + bend,
        );
    }
    for (node, (x, y)) in &at {
        let _ = write!(
            out,
            "<g class=\"node\" data-card=\"{n}\"><rect x=\"{x}\" y=\"{y}\" width=\"140\" height=\"30\" rx=\"6\" fill=\"#eef5ff\" stroke=\"#4b84d6\"/>\
             <text x=\"{tx}\" y=\"{ty}\">{n}</text></g>",
            n = esc(node),
            tx = x + 8,
            ty = y + 19,
        );
    }
    out + "</svg>"
}

/// `GET /workflow`: the graph, and the rules behind each edge.
pub async fn workflow(State(console): State<Arc<Console>>) -> Response {
    let taken = match console.index.edges(now_ms() - 60 * 60_000) {
        Ok(e) => e,
        Err(e) => return failed(e),
    };
    let allowed = rule_edges(&console.workflow.rules);
    let mut nodes: BTreeSet<String> = console
        .workflow
        .cards
        .iter()
        .map(|c| c.name.clone())
        .collect();
    nodes.extend(["start".to_string(), "done".to_string()]);
    let mut edges: BTreeMap<(String, String), i64> =
        allowed.keys().map(|k| (k.clone(), 0)).collect();
    for (source, target, n) in taken {
        *edges.entry((source, target)).or_default() += n;
    }
    for (s, t) in edges.keys() {
        nodes.insert(s.clone());
        nodes.insert(t.clone());
    }
    let list: Vec<(String, String, i64)> = edges.into_iter().map(|((s, t), n)| (s, t, n)).collect();
    let mut rules = String::new();
    for ((source, target), ids) in &allowed {
        let _ = write!(
            rules,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(source),
            esc(target),
            esc(&ids.join(", "))
        );
    }
    let body = format!(
        "<p>Edges are what the rule table allows, labelled with the tasks that took them in the last hour.</p>{}\
         <h2>Rules</h2><table><thead><tr><th>from</th><th>to</th><th>rules</th></tr></thead><tbody>{rules}</tbody></table>",
        svg(&nodes, &list)
    );
    Html(page("Workflow", "/workflow", None, &body)).into_response()
}
