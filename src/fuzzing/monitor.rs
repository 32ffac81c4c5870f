//! What kata-monitor reads of a request before scraping: the query string, `Accept`,
//! `Accept-Encoding` and Prometheus' scrape timeout header.

use crate::mgmt::paths::validate_id;
use crate::mgmt::server::accepts_gzip_in;
use crate::monitor::http::{scrape_budget, Query};
use crate::monitor::render::{FamilyFilter, Format};

/// `data` holds up to four lines: the query string, then the three header values.
pub fn monitor_request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let query = parts.next().unwrap_or_default();
    let accept = parts.next();
    let encoding = parts.next();
    let timeout = parts.next();

    check_query(query);
    check_accept(accept);
    if let Some(encoding) = encoding {
        check_encoding(encoding);
    }
    if let Some(budget) = scrape_budget(timeout) {
        let seconds = budget.as_secs_f64();
        assert!(
            (0.5..=3600.0).contains(&seconds),
            "{timeout:?} gave {budget:?}"
        );
    } else if let Some(seconds) = timeout.and_then(|t| t.trim().parse::<f64>().ok()) {
        assert!(
            !(seconds.is_finite() && seconds > 0.0),
            "{timeout:?} ignored"
        );
    }
}

fn check_query(query: &str) {
    let parsed = Query::parse(query);
    // Decoding undoes any percent-encoding of what was decoded.
    let encoded: Vec<String> = parsed
        .0
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect();
    let again = Query::parse(&encoded.join("&"));
    assert_eq!(again.0, parsed.0, "{query:?}");
    // Text without escapes decodes to itself.
    if !query.contains(['%', '+']) {
        let raw: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        assert_eq!(raw.len(), parsed.0.len());
        for (pair, (k, v)) in raw.iter().zip(&parsed.0) {
            let (rk, rv) = pair.split_once('=').unwrap_or((pair, ""));
            assert_eq!((rk, rv), (k.as_str(), v.as_str()));
        }
    }
    // First value wins.
    for (k, _) in &parsed.0 {
        let first = parsed.0.iter().find(|(name, _)| name == k).map(|(_, v)| v);
        assert!(parsed.get(k).is_some() && parsed.get(k) == first.map(String::as_str));
    }
    let filter = FamilyFilter::new(parsed.get("filter_family").unwrap_or_default());
    for prefix in parsed.get("filter_family").unwrap_or_default().split(',') {
        let prefix = prefix.trim();
        if prefix.is_empty() {
            continue;
        }
        assert!(filter.keeps(prefix) && filter.keeps(&format!("{prefix}_x")));
    }
    if let Some(id) = parsed.get("sandbox") {
        // The id is echoed in answers and joined to paths only once it is valid.
        if validate_id(id).is_ok() {
            assert!(!id.is_empty() && id.len() <= 76, "{id:?}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
                "{id:?}"
            );
            assert!(
                !id.contains("..") && !id.starts_with(['.', '-', '_']),
                "{id:?}"
            );
        }
    }
}

/// Every byte as `%XX`: the most escaped spelling.
fn percent_encode(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// OpenMetrics only when some item names it with no quality at or below 0 (or unreadable).
fn check_accept(accept: Option<&str>) {
    let format = Format::from_accept(accept);
    let asked = accept.is_some_and(|accept| {
        accept.split(',').any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            media.eq_ignore_ascii_case("application/openmetrics-text")
                && parts.all(|p| {
                    p.strip_prefix("q=")
                        .map_or(true, |q| q.trim().parse::<f32>().is_ok_and(|q| q > 0.0))
                })
        })
    });
    assert_eq!(format == Format::OpenMetrics, asked, "{accept:?}");
}

/// gzip only when `gzip` or `*` is listed with a quality above 0.
fn check_encoding(encoding: &str) {
    let gzip = accepts_gzip_in(std::iter::once(encoding));
    if gzip {
        assert!(
            encoding.to_ascii_lowercase().contains("gzip") || encoding.contains('*'),
            "{encoding:?}"
        );
    }
    assert!(!accepts_gzip_in(std::iter::empty()));
}
