//! A deliberately small reader of Prometheus text for assertions, independent of the crate's parser.

use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample line of `text`.
pub fn samples(text: &str) -> Vec<Line> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| parse_line(line).unwrap_or_else(|| panic!("unreadable sample line: {line:?}")))
        .collect()
}

fn parse_line(line: &str) -> Option<Line> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Line {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        labels.insert(key.trim().to_string(), value);
        rest = after[end + 1..].trim_start_matches(',').trim();
    }
    Some(labels)
}

/// The samples of one family name (exact sample name).
pub fn family<'a>(all: &'a [Line], name: &str) -> Vec<&'a Line> {
    all.iter().filter(|l| l.name == name).collect()
}

/// The value of the one sample `name` whose labels include all of `labels`.
pub fn value(all: &[Line], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<&Line> = all
        .iter()
        .filter(|l| l.name == name)
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    match matching.as_slice() {
        [one] => Some(one.value),
        [] => None,
        many => panic!("{} samples of {name} match {labels:?}", many.len()),
    }
}

/// Whether any sample's name starts with `prefix`.
pub fn has_prefix(all: &[Line], prefix: &str) -> bool {
    all.iter().any(|l| l.name.starts_with(prefix))
}
