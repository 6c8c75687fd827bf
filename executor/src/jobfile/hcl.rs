//! Reading a job file: the HCL text parsed (by `hcl-rs`'s own parser,
//! which keeps positions) into a small tree of blocks and attributes that
//! each know their line, and the typed reads of attribute values with the
//! leniency the original driver needs (its values were strings).

use hcl::Number;
use hcl::edit::Span;
use hcl::edit::structure::{Body, Structure};
use hcl::eval::{Context, Evaluate};

pub use hcl::Value;

/// Malformed HCL, where the parser stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// A block with its labels, its attributes and its nested blocks, in
/// source order. The file itself is a block with an empty identifier.
#[derive(Debug, Clone)]
pub struct Block {
    pub ident: String,
    pub labels: Vec<String>,
    pub line: usize,
    pub attrs: Vec<Attr>,
    pub blocks: Vec<Block>,
}

#[derive(Debug, Clone)]
pub struct Attr {
    pub key: String,
    pub line: usize,
    expr: hcl::Expression,
}

/// A problem found while reading one value, before the field's name and
/// line are attached to it.
pub type ValueResult<T> = Result<T, String>;

/// Parses a job file into its tree. The parser refuses an attribute set
/// twice in one block, as HCL's specification asks.
pub fn parse(text: &str) -> Result<Block, SyntaxError> {
    let body = hcl::edit::parser::parse_body(text).map_err(|e| SyntaxError {
        line: e.location().line(),
        column: e.location().column(),
        message: e.message().to_string(),
    })?;
    let lines = LineIndex::new(text);
    convert_body("", Vec::new(), 1, &body, &lines)
}

fn convert_body(
    ident: &str,
    labels: Vec<String>,
    line: usize,
    body: &Body,
    lines: &LineIndex,
) -> Result<Block, SyntaxError> {
    let mut block = Block {
        ident: ident.to_string(),
        labels,
        line,
        attrs: Vec::new(),
        blocks: Vec::new(),
    };
    for structure in body.iter() {
        let at = lines.line_of(structure.span());
        match structure {
            Structure::Attribute(attr) => {
                block.attrs.push(Attr {
                    key: attr.key.as_str().to_string(),
                    line: at,
                    expr: attr.value.clone().into(),
                });
            }
            Structure::Block(inner) => {
                let labels = inner
                    .labels
                    .iter()
                    .map(|l| l.as_str().to_string())
                    .collect();
                block.blocks.push(convert_body(
                    inner.ident.as_str(),
                    labels,
                    at,
                    &inner.body,
                    lines,
                )?);
            }
        }
    }
    Ok(block)
}

/// Byte offset → line number.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex(starts)
    }

    fn line_of(&self, span: Option<std::ops::Range<usize>>) -> usize {
        let offset = span.map_or(0, |s| s.start);
        self.0.partition_point(|&start| start <= offset)
    }
}

impl Block {
    /// The first label, or "" for an unlabelled block.
    pub fn label(&self) -> &str {
        self.labels.first().map_or("", String::as_str)
    }

    pub fn attr(&self, key: &str) -> Option<&Attr> {
        self.attrs.iter().find(|a| a.key == key)
    }

    pub fn blocks_named<'a>(&'a self, ident: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
        self.blocks.iter().filter(move |b| b.ident == ident)
    }
}

impl Attr {
    /// The attribute's value. Only literals and expressions over literals
    /// evaluate: the scheduler's variables and run-time interpolations
    /// (`${NOMAD_PORT_http}`) have no value outside the scheduler.
    pub fn value(&self) -> ValueResult<Value> {
        self.expr.evaluate(&Context::new()).map_err(|e| {
            format!(
                "cannot be evaluated outside the scheduler ({}); write the value itself",
                e.to_string().trim()
            )
        })
    }

    pub fn string(&self) -> ValueResult<String> {
        as_string(&self.value()?)
    }

    pub fn int(&self) -> ValueResult<i64> {
        as_int(&self.value()?)
    }

    pub fn bool(&self) -> ValueResult<bool> {
        as_bool(&self.value()?)
    }

    pub fn strings(&self) -> ValueResult<Vec<String>> {
        match self.value()? {
            Value::Array(items) => items.iter().map(as_string).collect(),
            other => Err(format!(
                "expected a list of strings, found {}",
                kind(&other)
            )),
        }
    }

    /// A duration in whole seconds, rounded up (a timeout is never made
    /// shorter), and whether rounding was needed.
    pub fn duration_s(&self) -> ValueResult<(i64, bool)> {
        match self.value()? {
            Value::String(s) => parse_duration_s(&s),
            other => Err(format!(
                "expected a duration string like \"30s\" or \"5m\", found {}",
                kind(&other)
            )),
        }
    }
}

pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub fn as_string(value: &Value) -> ValueResult<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("expected a string, found {}", kind(other))),
    }
}

/// A whole number, written as a number or, as the original driver's
/// string-typed config had it, as a string of one (`"8080"`).
pub fn as_int(value: &Value) -> ValueResult<i64> {
    match value {
        Value::Number(n) => number_to_int(n),
        Value::String(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("expected a whole number, found the string {s:?}")),
        other => Err(format!("expected a whole number, found {}", kind(other))),
    }
}

fn number_to_int(n: &Number) -> ValueResult<i64> {
    n.as_i64()
        .ok_or_else(|| format!("expected a whole number, found {n}"))
}

/// A bool, or the strings "true"/"false" of the original driver.
pub fn as_bool(value: &Value) -> ValueResult<bool> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" => Ok(false),
        other => Err(format!("expected true or false, found {}", show(other))),
    }
}

/// A value as a person would recognise it in an error.
pub fn show(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => kind(other).to_string(),
    }
}

/// Parses a duration as the scheduler writes them (Go's syntax: "30s",
/// "5m", "1h30m", "1.5h", "250ms") into whole seconds, rounded up.
pub fn parse_duration_s(text: &str) -> ValueResult<(i64, bool)> {
    let bad = || {
        format!(
            "{text:?} is not a duration: write a number and a unit (ns, us, ms, s, m, h), like \"30s\" or \"5m\""
        )
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    if s == "0" {
        return Ok((0, false));
    }
    let mut nanos: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, tail) = rest.split_at(split);
        let number: f64 = number.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        nanos += number * scale;
        rest = tail;
    }
    // Above 100 years the seconds no longer fit anything we accept; the
    // range checks of the task name the field.
    let secs = (nanos / 1e9).min(3.2e9);
    let whole = secs.ceil();
    Ok((whole as i64, whole != secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_labels() {
        let text =
            "job \"web\" {\n  type = \"service\"\n\n  group \"g\" {\n    count = 1\n  }\n}\n";
        let file = parse(text).unwrap();
        let job = &file.blocks[0];
        assert_eq!(
            (job.ident.as_str(), job.label(), job.line),
            ("job", "web", 1)
        );
        assert_eq!(job.attrs[0].line, 2);
        let group = &job.blocks[0];
        assert_eq!((group.label(), group.line), ("g", 4));
        assert_eq!(group.attr("count").unwrap().line, 5);
        assert_eq!(group.attr("count").unwrap().int(), Ok(1));
    }

    #[test]
    fn syntax_errors_carry_their_line() {
        let err = parse("job \"x\" {\n  a = 1\n  b = = 2\n}\n").unwrap_err();
        assert_eq!(err.line, 3, "{err:?}");
        let err = parse("job \"x\" {\n  group \"g\" {\n").unwrap_err();
        assert!(err.line >= 2, "{err:?}");
        let err = parse("job \"x\" {\n  a = 1\n  a = 2\n}\n").unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.message.contains("redefined attribute"), "{err:?}");
    }

    #[test]
    fn lenient_scalars() {
        let file = parse(
            "a = \"8080\"\nb = 8080\nc = \"x\"\nd = 1.5\ne = \"true\"\nf = false\ng = 2 * 512\nh = \"${NOMAD_PORT_http}\"\ni = <<EOF\nhi\nEOF\n",
        )
        .unwrap();
        let a = |k: &str| file.attr(k).unwrap();
        assert_eq!(a("a").int(), Ok(8080));
        assert_eq!(a("b").int(), Ok(8080));
        assert!(a("c").int().unwrap_err().contains("\"x\""));
        assert!(a("d").int().unwrap_err().contains("1.5"));
        assert_eq!(a("e").bool(), Ok(true));
        assert_eq!(a("f").bool(), Ok(false));
        assert!(a("b").bool().is_err());
        assert_eq!(a("g").int(), Ok(1024));
        assert!(a("b").string().unwrap_err().contains("a number"));
        let err = a("h").string().unwrap_err();
        assert!(err.contains("outside the scheduler"), "{err}");
        assert_eq!(a("i").string(), Ok("hi\n".to_string()));
    }

    #[test]
    fn durations() {
        for (text, want) in [
            ("30s", (30, false)),
            ("5m", (300, false)),
            ("1h30m", (5400, false)),
            ("1.5h", (5400, false)),
            ("250ms", (1, true)),
            ("1500ms", (2, true)),
            ("0", (0, false)),
            ("0s", (0, false)),
            ("24h", (86_400, false)),
        ] {
            assert_eq!(parse_duration_s(text), Ok(want), "{text}");
        }
        for bad in ["", "30", "5 m", "s", "1d", "-5s", "1.2.3s"] {
            let err = parse_duration_s(bad).unwrap_err();
            assert!(err.contains("is not a duration"), "{bad}: {err}");
        }
    }
}
