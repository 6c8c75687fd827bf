//! Nomad's configuration bytes: go-cty values encoded as msgpack. The
//! client decodes the job's HCL against our schema and encodes the result,
//! so every schema attribute is present (nil when unset), numbers arrive
//! as the smallest integer, as a float64, or as a decimal string when
//! neither holds them exactly, and unknown values are msgpack extensions.
//! They become JSON values here, for serde to read into our structs.

use serde::de::{self, Deserialize, Deserializer};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CtyError {
    #[error("Not valid msgpack: {0}")]
    Msgpack(String),
    #[error("{path}: {problem}")]
    Value { path: String, problem: String },
    #[error("Trailing bytes after the value")]
    Trailing,
}

/// Decodes one cty msgpack value. Empty bytes (no config block and no
/// schema) read as null.
pub fn decode(bytes: &[u8]) -> Result<serde_json::Value, CtyError> {
    if bytes.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    if contains_reserved_marker(bytes)? {
        return Err(CtyError::Msgpack("the reserved marker 0xc1".into()));
    }
    let mut cursor = bytes;
    let value =
        rmpv::decode::read_value(&mut cursor).map_err(|e| CtyError::Msgpack(e.to_string()))?;
    if !cursor.is_empty() {
        return Err(CtyError::Trailing);
    }
    to_json(value, "config")
}

/// rmpv reads msgpack's reserved marker 0xc1 as nil, which would turn
/// garbage into an empty config: walk the value's markers first.
fn contains_reserved_marker(bytes: &[u8]) -> Result<bool, CtyError> {
    let mut cursor = bytes;
    let mut left = 1u64;
    while left > 0 {
        left -= 1;
        let marker = rmp::decode::read_marker(&mut cursor)
            .map_err(|_| CtyError::Msgpack("truncated".into()))?;
        use rmp::Marker as K;
        let skip = |cursor: &mut &[u8], n: usize| -> Result<(), CtyError> {
            if cursor.len() < n {
                return Err(CtyError::Msgpack("truncated".into()));
            }
            *cursor = &cursor[n..];
            Ok(())
        };
        let read_len = |cursor: &mut &[u8], width: usize| -> Result<usize, CtyError> {
            if cursor.len() < width {
                return Err(CtyError::Msgpack("truncated".into()));
            }
            let mut n = 0usize;
            for b in &cursor[..width] {
                n = (n << 8) | usize::from(*b);
            }
            *cursor = &cursor[width..];
            Ok(n)
        };
        match marker {
            K::Reserved => return Ok(true),
            K::FixPos(_) | K::FixNeg(_) | K::Null | K::True | K::False => {}
            K::U8 | K::I8 => skip(&mut cursor, 1)?,
            K::U16 | K::I16 => skip(&mut cursor, 2)?,
            K::U32 | K::I32 | K::F32 => skip(&mut cursor, 4)?,
            K::U64 | K::I64 | K::F64 => skip(&mut cursor, 8)?,
            K::FixStr(n) => skip(&mut cursor, usize::from(n))?,
            K::Str8 | K::Bin8 => {
                let n = read_len(&mut cursor, 1)?;
                skip(&mut cursor, n)?;
            }
            K::Str16 | K::Bin16 => {
                let n = read_len(&mut cursor, 2)?;
                skip(&mut cursor, n)?;
            }
            K::Str32 | K::Bin32 => {
                let n = read_len(&mut cursor, 4)?;
                skip(&mut cursor, n)?;
            }
            K::FixArray(n) => left += u64::from(n),
            K::Array16 => left += read_len(&mut cursor, 2)? as u64,
            K::Array32 => left += read_len(&mut cursor, 4)? as u64,
            K::FixMap(n) => left += 2 * u64::from(n),
            K::Map16 => left += 2 * read_len(&mut cursor, 2)? as u64,
            K::Map32 => left += 2 * read_len(&mut cursor, 4)? as u64,
            K::FixExt1 => skip(&mut cursor, 2)?,
            K::FixExt2 => skip(&mut cursor, 3)?,
            K::FixExt4 => skip(&mut cursor, 5)?,
            K::FixExt8 => skip(&mut cursor, 9)?,
            K::FixExt16 => skip(&mut cursor, 17)?,
            K::Ext8 => {
                let n = read_len(&mut cursor, 1)?;
                skip(&mut cursor, n + 1)?;
            }
            K::Ext16 => {
                let n = read_len(&mut cursor, 2)?;
                skip(&mut cursor, n + 1)?;
            }
            K::Ext32 => {
                let n = read_len(&mut cursor, 4)?;
                skip(&mut cursor, n + 1)?;
            }
        }
    }
    Ok(false)
}

fn to_json(value: rmpv::Value, path: &str) -> Result<serde_json::Value, CtyError> {
    use rmpv::Value as M;
    use serde_json::Value as J;
    let bad = |problem: String| CtyError::Value {
        path: path.to_string(),
        problem,
    };
    Ok(match value {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(b),
        M::Integer(i) => {
            if let Some(v) = i.as_i64() {
                J::from(v)
            } else if let Some(v) = i.as_u64() {
                J::from(v)
            } else {
                return Err(bad("an integer out of range".into()));
            }
        }
        M::F32(f) => float(f64::from(f)).ok_or_else(|| bad("not a finite number".into()))?,
        M::F64(f) => float(f).ok_or_else(|| bad("not a finite number".into()))?,
        M::String(s) => J::String(
            s.into_str()
                .ok_or_else(|| bad("a string that is not UTF-8".into()))?,
        ),
        M::Binary(_) => {
            return Err(bad(
                "a dynamically typed value, which this schema does not have".into(),
            ));
        }
        M::Array(items) => J::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        M::Map(entries) => {
            let mut map = serde_json::Map::new();
            for (k, v) in entries {
                let M::String(key) = k else {
                    return Err(bad(format!("a map key that is not a string: {k}")));
                };
                let key = key
                    .into_str()
                    .ok_or_else(|| bad("a map key that is not UTF-8".into()))?;
                let v = to_json(v, &format!("{path}.{key}"))?;
                map.insert(key, v);
            }
            J::Object(map)
        }
        M::Ext(..) => {
            return Err(bad(
                "an unknown value (the client could not evaluate it)".into()
            ));
        }
    })
}

fn float(f: f64) -> Option<serde_json::Value> {
    serde_json::Number::from_f64(f).map(serde_json::Value::Number)
}

/// Reads `T` from a decoded config; a problem names the field it is in.
pub fn read<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, CtyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        CtyError::Value {
            path: if path == "." { "config".into() } else { path },
            problem: e.into_inner().to_string(),
        }
    })
}

/// A whole number from a cty number: an integer, a float without a
/// fraction, or the decimal string cty falls back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Whole(pub i64);

impl<'de> Deserialize<'de> for Whole {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Whole, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let whole = match &value {
            serde_json::Value::Number(n) => n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            }),
            serde_json::Value::String(s) => s.parse::<i64>().ok(),
            _ => {
                return Err(de::Error::invalid_type(
                    de::Unexpected::Other(kind(&value)),
                    &"a whole number",
                ));
            }
        };
        whole
            .map(Whole)
            .ok_or_else(|| de::Error::custom(format!("{value} is not a whole number")))
    }
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a bool",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: Option<String>,
        port: Option<Whole>,
        list: Option<Vec<std::collections::BTreeMap<String, Whole>>>,
    }

    /// The object cty writes for `{name = "web", port = 8080}` with `list`
    /// unset: keys sorted, the unset one present as nil.
    const SAMPLE: &[u8] = &[
        0x83, 0xa4, b'l', b'i', b's', b't', 0xc0, 0xa4, b'n', b'a', b'm', b'e', 0xa3, b'w', b'e',
        b'b', 0xa4, b'p', b'o', b'r', b't', 0xcd, 0x1f, 0x90,
    ];

    #[test]
    fn reads_a_cty_object_with_nil_attributes() {
        let s: Sample = read(decode(SAMPLE).unwrap()).unwrap();
        assert_eq!(s.name.as_deref(), Some("web"));
        assert_eq!(s.port, Some(Whole(8080)));
        assert!(s.list.is_none());
    }

    #[test]
    fn numbers_in_every_cty_shape() {
        // fixint, negative fixint, uint16, float64 without a fraction, and
        // the decimal string cty uses for numbers float64 cannot hold.
        for (bytes, want) in [
            (vec![0x05], 5),
            (vec![0xff], -1),
            (vec![0xcd, 0x1f, 0x90], 8080),
            (vec![0xcb, 0x40, 0x59, 0, 0, 0, 0, 0, 0], 100),
            (vec![0xa2, b'4', b'2'], 42),
        ] {
            let v: Whole = read(decode(&bytes).unwrap()).unwrap();
            assert_eq!(v, Whole(want), "{bytes:x?}");
        }
        let err = read::<Whole>(decode(&[0xa3, b'0', b'.', b'1']).unwrap()).unwrap_err();
        assert!(err.to_string().contains("not a whole number"), "{err}");
    }

    #[test]
    fn problems_name_the_field() {
        // {"port": "http"}
        let bytes = [
            0x81, 0xa4, b'p', b'o', b'r', b't', 0xa4, b'h', b't', b't', b'p',
        ];
        let err = read::<Sample>(decode(&bytes).unwrap()).unwrap_err();
        assert!(err.to_string().starts_with("port:"), "{err}");
        // {"prot": 1}
        let bytes = [0x81, 0xa4, b'p', b'r', b'o', b't', 0x01];
        let err = read::<Sample>(decode(&bytes).unwrap()).unwrap_err();
        assert!(err.to_string().contains("unknown field `prot`"), "{err}");
    }

    #[test]
    fn refuses_what_cty_never_sends_here() {
        assert!(matches!(decode(&[0xc1]), Err(CtyError::Msgpack(_))));
        // Inside a map too.
        assert!(matches!(
            decode(&[0x81, 0xa1, b'x', 0xc1]),
            Err(CtyError::Msgpack(_))
        ));
        assert!(matches!(
            decode(&[0x82, 0xa1, b'x']),
            Err(CtyError::Msgpack(_))
        ));
        assert_eq!(decode(&[0xc0, 0xc0]), Err(CtyError::Trailing));
        // An unknown value: extension type 0.
        let err = decode(&[0x81, 0xa1, b'x', 0xd4, 0x00, 0x00]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config.x: an unknown value (the client could not evaluate it)"
        );
        assert_eq!(decode(&[]).unwrap(), serde_json::Value::Null);
    }
}
