//! Typed, spanned reading of one TOML section.
//!
//! `SectionReader` is the only place that turns TOML values into config values. Each call names
//! a key, its default, its documentation and what is allowed; the reader returns the value (or
//! the default), records every problem with the file line it comes from, and remembers which keys
//! it was asked for so that everything left over is reported as an unknown key. The same calls,
//! run on an empty section, produce the key reference in docs/config.md, so the documentation
//! cannot drift from the code.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem found in a config file, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line of the offending key or value; 0 when the problem has no single place.
    pub line: usize,
    /// `section.key` (or just `section`) the problem is about.
    pub key: String,
    /// The offending value as written, if there is one.
    pub value: Option<String>,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// Documentation of one key, collected while reading.
#[derive(Debug, Clone)]
pub struct KeyDoc {
    pub key: String,
    pub kind: &'static str,
    pub default: String,
    pub doc: &'static str,
}

/// Reads the keys of one `[section]`, see the module documentation.
pub struct SectionReader<'a, 'i> {
    section: &'static str,
    table: Option<&'a DeTable<'i>>,
    source: &'a str,
    used: Vec<&'static str>,
    pub(crate) problems: &'a mut Vec<Problem>,
    pub(crate) docs: &'a mut Vec<KeyDoc>,
    /// Lines of the keys read so far, for problems that involve several keys.
    lines: Vec<(&'static str, usize)>,
}

impl<'a, 'i> SectionReader<'a, 'i> {
    pub(crate) fn new(
        section: &'static str,
        table: Option<&'a DeTable<'i>>,
        source: &'a str,
        problems: &'a mut Vec<Problem>,
        docs: &'a mut Vec<KeyDoc>,
    ) -> Self {
        Self {
            section,
            table,
            source,
            used: Vec::new(),
            problems,
            docs,
            lines: Vec::new(),
        }
    }

    /// Line of a key that was read from the file (0 when it was not in the file).
    pub fn line_of(&self, key: &str) -> usize {
        self.lines
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, l)| *l)
            .unwrap_or(0)
    }

    /// Records a problem that involves a key of this section.
    pub fn problem(&mut self, key: &str, value: Option<String>, message: impl Into<String>) {
        let line = self.line_of(key);
        self.problems.push(Problem {
            line,
            key: format!("{}.{}", self.section, key),
            value,
            message: message.into(),
        });
    }

    fn lookup(
        &mut self,
        key: &'static str,
        kind: &'static str,
        default: String,
        doc: &'static str,
    ) -> Option<&'a Spanned<DeValue<'i>>> {
        self.used.push(key);
        self.docs.push(KeyDoc {
            key: format!("{}.{}", self.section, key),
            kind,
            default,
            doc,
        });
        let table = self.table?;
        let value = table.get(key)?;
        let line = line_of_offset(self.source, value.span().start);
        self.lines.push((key, line));
        Some(value)
    }

    fn wrong_type(&mut self, key: &'static str, value: &Spanned<DeValue<'_>>, expected: &str) {
        let shown = show(value.get_ref());
        self.problem(
            key,
            Some(shown),
            format!("expected {expected}, found {}", type_name(value.get_ref())),
        );
    }

    /// A boolean.
    pub fn bool(&mut self, key: &'static str, default: bool, doc: &'static str) -> bool {
        match self.lookup(key, "boolean", default.to_string(), doc) {
            None => default,
            Some(v) => match v.get_ref() {
                DeValue::Boolean(b) => *b,
                _ => {
                    self.wrong_type(key, v, "true or false");
                    default
                }
            },
        }
    }

    /// An integer within `range` (inclusive).
    pub fn int(
        &mut self,
        key: &'static str,
        default: i64,
        range: (i64, i64),
        doc: &'static str,
    ) -> i64 {
        let kind = "integer";
        match self.lookup(key, kind, default.to_string(), doc) {
            None => default,
            Some(v) => match v.get_ref() {
                DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                    Ok(n) if n >= range.0 && n <= range.1 => n,
                    _ => {
                        self.problem(
                            key,
                            Some(i.as_str().to_string()),
                            format!("out of range: allowed {} to {}", range.0, range.1),
                        );
                        default
                    }
                },
                _ => {
                    self.wrong_type(
                        key,
                        v,
                        &format!("an integer from {} to {}", range.0, range.1),
                    );
                    default
                }
            },
        }
    }

    /// A UDP/TCP port number (1–65535).
    pub fn port(&mut self, key: &'static str, default: u16, doc: &'static str) -> u16 {
        // `int` already range-checked, so the conversion cannot fail.
        u16::try_from(self.int(key, i64::from(default), (1, 65535), doc)).unwrap_or(default)
    }

    /// A floating point number within `range` (inclusive).
    pub fn float(
        &mut self,
        key: &'static str,
        default: f64,
        range: (f64, f64),
        doc: &'static str,
    ) -> f64 {
        match self.lookup(key, "float", default.to_string(), doc) {
            None => default,
            Some(v) => {
                let n = match v.get_ref() {
                    DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
                    DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                        .ok()
                        .map(|n| n as f64),
                    _ => {
                        self.wrong_type(key, v, "a number");
                        return default;
                    }
                };
                match n {
                    Some(n) if n >= range.0 && n <= range.1 => n,
                    _ => {
                        self.problem(
                            key,
                            Some(show(v.get_ref())),
                            format!("out of range: allowed {} to {}", range.0, range.1),
                        );
                        default
                    }
                }
            }
        }
    }

    /// A string, checked by `check` (which returns what is allowed on failure).
    pub fn string(
        &mut self,
        key: &'static str,
        default: &str,
        doc: &'static str,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> String {
        match self.lookup(key, "string", format!("{default:?}"), doc) {
            None => default.to_string(),
            Some(v) => match v.get_ref() {
                DeValue::String(s) => match check(s) {
                    Ok(()) => s.to_string(),
                    Err(allowed) => {
                        self.problem(key, Some(format!("{s:?}")), allowed);
                        default.to_string()
                    }
                },
                _ => {
                    self.wrong_type(key, v, "a string");
                    default.to_string()
                }
            },
        }
    }

    /// One of a fixed set of words.
    pub fn choice(
        &mut self,
        key: &'static str,
        default: &str,
        allowed: &'static [&'static str],
        doc: &'static str,
    ) -> String {
        self.string(key, default, doc, |s| {
            if allowed.contains(&s) {
                Ok(())
            } else {
                Err(format!("allowed values: {}", allowed.join(", ")))
            }
        })
    }

    /// A socket address `ip:port`.
    pub fn socket_addr(
        &mut self,
        key: &'static str,
        default: &str,
        doc: &'static str,
    ) -> SocketAddr {
        let s = self.string(key, default, doc, |s| parse_socket_addr(s).map(|_| ()));
        parse_socket_addr(&s)
            .or_else(|_| parse_socket_addr(default))
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// An IP address.
    pub fn ip(&mut self, key: &'static str, default: &str, doc: &'static str) -> IpAddr {
        let s = self.string(key, default, doc, |s| {
            s.parse::<IpAddr>()
                .map(|_| ())
                .map_err(|_| "expected an IPv4 or IPv6 address such as 0.0.0.0 or ::".to_string())
        });
        s.parse()
            .or_else(|_| default.parse())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]))
    }

    /// A list of strings, each checked by `check`.
    pub fn string_list(
        &mut self,
        key: &'static str,
        default: &[&str],
        doc: &'static str,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Vec<String> {
        let default_owned: Vec<String> = default.iter().map(|s| s.to_string()).collect();
        let Some(v) = self.lookup(key, "list of strings", format!("{default_owned:?}"), doc) else {
            return default_owned;
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(key, v, "a list of strings");
            return default_owned;
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => match check(s) {
                    Ok(()) => out.push(s.to_string()),
                    Err(allowed) => self.problem(key, Some(format!("{s:?}")), allowed),
                },
                other => self.problem(
                    key,
                    Some(show(other)),
                    format!("expected a string in the list, found {}", type_name(other)),
                ),
            }
        }
        out
    }

    /// Reports every key of the section that no reader call asked for.
    pub(crate) fn finish(self) {
        let Some(table) = self.table else { return };
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            if !self.used.contains(&name) {
                let line = line_of_offset(self.source, key.span().start);
                let known: Vec<&str> = self.used.clone();
                self.problems.push(Problem {
                    line,
                    key: format!("{}.{}", self.section, name),
                    value: Some(show(value.get_ref())),
                    message: format!(
                        "unknown key; keys of [{}]: {}",
                        self.section,
                        known.join(", ")
                    ),
                });
            }
        }
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| "expected ADDRESS:PORT such as 127.0.0.1:8443 or [::]:443".to_string())
        .and_then(|a| {
            if a.port() == 0 {
                Err("port 0 is not allowed: name a port from 1 to 65535".to_string())
            } else {
                Ok(a)
            }
        })
}

/// 1-based line number of a byte offset.
pub fn line_of_offset(source: &str, offset: usize) -> usize {
    let end = offset.min(source.len());
    source.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub(crate) fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "a list",
        DeValue::Table(_) => "a table",
    }
}

pub(crate) fn show(v: &DeValue<'_>) -> String {
    let s: Cow<'_, str> = match v {
        DeValue::String(s) => format!("{s:?}").into(),
        DeValue::Integer(i) => i.as_str().into(),
        DeValue::Float(f) => f.as_str().into(),
        DeValue::Boolean(b) => b.to_string().into(),
        DeValue::Datetime(d) => d.to_string().into(),
        DeValue::Array(_) => "[...]".into(),
        DeValue::Table(_) => "{...}".into(),
    };
    // Long values are cut so that one problem stays one readable line.
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s.into_owned()
    }
}

/// A byte range in the source, for problems found by the parser itself.
pub(crate) fn line_of_span(source: &str, span: Option<Range<usize>>) -> usize {
    span.map(|r| line_of_offset(source, r.start)).unwrap_or(0)
}
