//! HTML building blocks: escaping (every text that comes from a record goes through [`esc`]),
//! the page layout, and small formatters.

use std::fmt::Write;

/// `text` escaped for HTML text and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` percent-encoded for a URL path segment or query value.
pub fn url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// How many bytes of a payload a page shows.
pub const PAYLOAD_CAP: usize = 16 * 1024;

/// A JSON value pretty-printed, cut at [`PAYLOAD_CAP`], escaped, in a collapsed block.
pub fn payload(label: &str, json: &str) -> String {
    let pretty = serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| json.to_string());
    let (shown, cut) = cap(&pretty);
    let note = if cut {
        format!(" (first {PAYLOAD_CAP} of {} bytes)", pretty.len())
    } else {
        String::new()
    };
    format!(
        "<details class=\"payload\"><summary>{}{note}</summary><pre>{}</pre></details>",
        esc(label),
        esc(shown)
    )
}

/// `text` cut to at most [`PAYLOAD_CAP`] bytes on a character boundary, and whether it was cut.
pub fn cap(text: &str) -> (&str, bool) {
    if text.len() <= PAYLOAD_CAP {
        return (text, false);
    }
    let mut end = PAYLOAD_CAP;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// A time in ms since the Unix epoch as `2026-12-05 09:30:01`.
pub fn time(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

/// The navigation entries: path and title.
const NAV: [(&str, &str); 7] = [
    ("/", "Overview"),
    ("/tasks", "Tasks"),
    ("/workflow", "Workflow"),
    ("/agents", "Agents"),
    ("/dead-letters", "Dead letters"),
    ("/inbox", "Inbox"),
    ("/login", "Token"),
];

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0;color:#1d232b}
nav{background:#1d232b;padding:8px 16px}nav a{color:#e8edf2;margin-right:16px;text-decoration:none}
nav a.here{font-weight:bold;text-decoration:underline}main{padding:16px}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #dde3ea;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f6f9}pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:400px}
.flash{padding:8px;margin-bottom:12px;background:#fff6d6;border:1px solid #e6c35c}
.llm{background:#eef5ff;border-left:3px solid #4b84d6;padding:4px 8px;margin:4px 0}
.status-completed{color:#1a7f37}.status-dead_lettered,.status-cancelled{color:#b42318}
.status-escalated{color:#9a6700}form.inline{display:inline}.muted{color:#6b7785}
.bar{display:inline-block;background:#4b84d6;height:10px}li.decision code{white-space:pre-wrap}";

/// A whole page: the navigation with `here` marked, an optional flash message, and `body`.
pub fn page(title: &str, here: &str, flash: Option<&str>, body: &str) -> String {
    let mut nav = String::new();
    for (path, name) in NAV {
        let class = if path == here { " class=\"here\"" } else { "" };
        let _ = write!(nav, "<a href=\"{path}\"{class}>{name}</a>");
    }
    let flash = flash
        .filter(|f| !f.is_empty())
        .map(|f| format!("<div class=\"flash\" id=\"flash\">{}</div>", esc(f)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · switchyard</title>\
         <style>{STYLE}</style></head><body><nav>{nav}</nav><main><h1>{}</h1>{flash}{body}</main></body></html>",
        esc(title),
        esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        let hostile = r#"<script>alert(1)</script>"><img src=x onerror='x'>&"#;
        let escaped = esc(hostile);
        assert!(!escaped.contains(['<', '>', '"', '\'']), "{escaped}");
        assert_eq!(
            escaped,
            "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=&#39;x&#39;&gt;&amp;"
        );
    }

    #[test]
    fn urls_keep_only_unreserved_characters() {
        assert_eq!(url("a b/c?d=é"), "a%20b%2Fc%3Fd%3D%C3%A9");
    }

    #[test]
    fn payloads_are_cut_on_a_character_boundary() {
        let long = "é".repeat(PAYLOAD_CAP);
        let (shown, cut) = cap(&long);
        assert!(cut && shown.len() <= PAYLOAD_CAP && shown.chars().all(|c| c == 'é'));
        assert!(payload("p", &format!("\"{long}\"")).contains("(first 16384 of"));
    }
}
