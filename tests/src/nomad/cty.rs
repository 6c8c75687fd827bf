//! The msgpack bytes a Nomad client sends for a task's `config {}` and a
//! plugin's `config {}`: what `cty/msgpack.Marshal` writes (go-cty, with
//! vmihailenco/msgpack v5 and compact ints) for the value `hcldec` decoded
//! from the job against the plugin's schema.
//!
//! The encoder writes the bytes itself rather than through a msgpack crate,
//! so that it shares nothing with the plugin's decoder: a mistake on one
//! side cannot be cancelled out by the same mistake on the other.
//!
//! The rules (see the protocol reference, §3.2):
//! - an object is a map whose keys are sorted bytewise and that holds every
//!   attribute of its schema, `nil` when the job does not set it;
//! - a number that is an exact int64 takes the smallest msgpack integer
//!   (positive fixint, uint8..64 for non-negative values; negative fixint,
//!   int8..64 below zero); any other float64 is a float64;
//! - a list is an array, a map a map with str keys (sorted, as cty iterates
//!   them).

use std::collections::BTreeMap;

/// A cty value, as far as driver configs use them.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// A number that is an exact int64.
    Int(i64),
    /// A number that is not (an integral float is written as the integer
    /// it is, as cty does).
    Float(f64),
    String(String),
    List(Vec<Value>),
    /// `map(T)`: string keys, iterated in key order by cty.
    Map(BTreeMap<String, Value>),
    /// An object of a schema: build it with [`object`] so that every
    /// attribute is present.
    Object(BTreeMap<String, Value>),
}

impl Value {
    /// A `map(T)` from pairs.
    pub fn map<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// A list from anything that converts to values.
    pub fn list<T: Into<Value>>(items: impl IntoIterator<Item = T>) -> Value {
        Value::List(items.into_iter().map(Into::into).collect())
    }

    /// This object or map with `key` set to `value`, schema or not: for
    /// configs a real client would never send (an unknown key).
    pub fn with(mut self, key: &str, value: Value) -> Value {
        match &mut self {
            Value::Object(m) | Value::Map(m) => {
                m.insert(key.to_string(), value);
            }
            other => panic!("with({key:?}) on a value that has no keys: {other:?}"),
        }
        self
    }

    /// The msgpack encoding of this value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(self, &mut out);
        out
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<u16> for Value {
    fn from(n: u16) -> Self {
        Value::Int(n.into())
    }
}

impl From<f64> for Value {
    fn from(n: f64) -> Self {
        Value::Float(n)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

/// The plugin's task schema (`TaskConfigSchema`): each attribute and its
/// HCL type, as the contract gives them.
pub const TASK_SCHEMA: [(&str, &str); 16] = [
    ("image_source", "string"),
    ("image_path", "string"),
    ("checksum", "string"),
    ("accelerator", "string"),
    ("kvm_fallback", "bool"),
    ("host_port", "number"),
    ("guest_port", "number"),
    ("port_map", "list(map(number))"),
    ("graceful_shutdown", "bool"),
    ("args", "list(string)"),
    ("machine_type", "string"),
    ("drive_interface", "string"),
    ("ready_serial", "string"),
    ("ready_timeout_s", "number"),
    ("ready_check", "string"),
    ("emulator", "string"),
];

/// The attributes of the task schema, without their types.
pub const TASK_ATTRIBUTES: [&str; 16] = names_of(TASK_SCHEMA);

const fn names_of<const N: usize>(schema: [(&'static str, &'static str); N]) -> [&'static str; N] {
    let mut names = [""; N];
    let mut i = 0;
    while i < N {
        names[i] = schema[i].0;
        i += 1;
    }
    names
}

/// The attributes of the plugin's own schema (`ConfigSchema`).
pub const PLUGIN_ATTRIBUTES: [&str; 5] = [
    "config",
    "state_dir",
    "cache_dir",
    "fingerprint_period_s",
    "policy",
];

/// The attributes of one `policy {}` block of the plugin's schema.
pub const POLICY_ATTRIBUTES: [&str; 5] = ["module", "sha256", "settings", "time_ms", "memory_mb"];

/// An object of the schema `attributes` with `set` given and every other
/// attribute null, as `hcldec` returns it. Panics on a name outside the
/// schema: a test that means to send one uses [`Value::with`].
pub fn object<'a>(attributes: &[&str], set: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    let mut m: BTreeMap<String, Value> = attributes
        .iter()
        .map(|a| (a.to_string(), Value::Null))
        .collect();
    for (name, value) in set {
        let slot = m
            .get_mut(name)
            .unwrap_or_else(|| panic!("{name:?} is not an attribute of {attributes:?}"));
        *slot = value;
    }
    Value::Object(m)
}

/// A task's `config {}` as the plugin receives it: the 16-attribute object
/// of its task schema with `set` given.
pub fn task_config<'a>(set: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    object(&TASK_ATTRIBUTES, set)
}

/// One `policy {}` block of the plugin config.
pub fn policy_block<'a>(set: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    object(&POLICY_ATTRIBUTES, set)
}

/// The plugin's `config {}`: `set` (anything but `policy`) and the policy
/// blocks, an empty list when there are none (hcldec's block list).
pub fn plugin_config<'a>(
    set: impl IntoIterator<Item = (&'a str, Value)>,
    policies: Vec<Value>,
) -> Value {
    let set: Vec<(&str, Value)> = set.into_iter().collect();
    assert!(
        set.iter().all(|(name, _)| *name != "policy"),
        "policy blocks go in `policies`"
    );
    object(&PLUGIN_ATTRIBUTES, set).with("policy", Value::List(policies))
}

fn encode_into(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.push(0xc0),
        Value::Bool(false) => out.push(0xc2),
        Value::Bool(true) => out.push(0xc3),
        Value::Int(n) => encode_int(*n, out),
        Value::Float(f) => encode_number(*f, out),
        Value::String(s) => encode_str(s, out),
        Value::List(items) => {
            encode_len(items.len(), [0x90, 0xdc, 0xdd], 16, out);
            for item in items {
                encode_into(item, out);
            }
        }
        Value::Map(m) | Value::Object(m) => {
            encode_len(m.len(), [0x80, 0xde, 0xdf], 16, out);
            // A BTreeMap<String, _> iterates in bytewise key order.
            for (k, v) in m {
                encode_str(k, out);
                encode_into(v, out);
            }
        }
    }
}

/// cty's number rule: an exact int64 as an integer, else a float64.
fn encode_number(f: f64, out: &mut Vec<u8>) {
    // i64::MAX as f64 rounds up to 2^63, which is out of range: hence `<`.
    let exact_int = f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64;
    if exact_int {
        encode_int(f as i64, out);
    } else {
        out.push(0xcb);
        out.extend_from_slice(&f.to_bits().to_be_bytes());
    }
}

/// vmihailenco's `EncodeInt` with compact ints: the smallest encoding,
/// unsigned for non-negative values.
fn encode_int(n: i64, out: &mut Vec<u8>) {
    if n >= 0 {
        let u = n as u64;
        if u <= 0x7f {
            out.push(u as u8);
        } else if u <= u8::MAX.into() {
            out.extend_from_slice(&[0xcc, u as u8]);
        } else if u <= u16::MAX.into() {
            out.push(0xcd);
            out.extend_from_slice(&(u as u16).to_be_bytes());
        } else if u <= u32::MAX.into() {
            out.push(0xce);
            out.extend_from_slice(&(u as u32).to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&u.to_be_bytes());
        }
    } else if n >= -32 {
        out.push(n as i8 as u8);
    } else if n >= i8::MIN.into() {
        out.extend_from_slice(&[0xd0, n as i8 as u8]);
    } else if n >= i16::MIN.into() {
        out.push(0xd1);
        out.extend_from_slice(&(n as i16).to_be_bytes());
    } else if n >= i32::MIN.into() {
        out.push(0xd2);
        out.extend_from_slice(&(n as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

fn encode_str(s: &str, out: &mut Vec<u8>) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n <= u8::MAX.into() {
        out.extend_from_slice(&[0xd9, n as u8]);
    } else if n <= u16::MAX.into() {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

/// The length header of an array or map: the fix form below `fix_limit`,
/// then the 16- and 32-bit forms.
fn encode_len(n: usize, [fix, x16, x32]: [u8; 3], fix_limit: usize, out: &mut Vec<u8>) {
    if n < fix_limit {
        out.push(fix | n as u8);
    } else if n <= u16::MAX.into() {
        out.push(x16);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(x32);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(n: i64) -> Vec<u8> {
        Value::Int(n).encode()
    }

    #[test]
    fn integers_take_the_smallest_encoding() {
        let cases: &[(i64, &[u8])] = &[
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0xcc, 0x80]),
            (255, &[0xcc, 0xff]),
            (256, &[0xcd, 0x01, 0x00]),
            (8080, &[0xcd, 0x1f, 0x90]),
            (65535, &[0xcd, 0xff, 0xff]),
            (65536, &[0xce, 0x00, 0x01, 0x00, 0x00]),
            (4_294_967_295, &[0xce, 0xff, 0xff, 0xff, 0xff]),
            (
                4_294_967_296,
                &[0xcf, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00],
            ),
            (
                i64::MAX,
                &[0xcf, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
            (-1, &[0xff]),
            (-32, &[0xe0]),
            (-33, &[0xd0, 0xdf]),
            (-128, &[0xd0, 0x80]),
            (-129, &[0xd1, 0xff, 0x7f]),
            (-32768, &[0xd1, 0x80, 0x00]),
            (-32769, &[0xd2, 0xff, 0xff, 0x7f, 0xff]),
            (-2_147_483_648, &[0xd2, 0x80, 0x00, 0x00, 0x00]),
            (
                -2_147_483_649,
                &[0xd3, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff],
            ),
            (
                i64::MIN,
                &[0xd3, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
            ),
        ];
        for (n, bytes) in cases {
            assert_eq!(int(*n), *bytes, "{n}");
        }
    }

    #[test]
    fn integral_floats_are_integers_and_others_float64() {
        assert_eq!(Value::Float(256.0).encode(), [0xcd, 0x01, 0x00]);
        assert_eq!(Value::Float(-0.0).encode(), [0x00]);
        assert_eq!(Value::Float(-40.0).encode(), [0xd0, 0xd8]);
        let mut half = vec![0xcb];
        half.extend_from_slice(&1.5f64.to_bits().to_be_bytes());
        assert_eq!(Value::Float(1.5).encode(), half);
        assert_eq!(
            Value::Float(0.25).encode(),
            [0xcb, 0x3f, 0xd0, 0, 0, 0, 0, 0, 0]
        );
        // 2^63 does not fit an int64: a float64, as cty writes it.
        assert_eq!(
            Value::Float(9_223_372_036_854_775_808.0).encode(),
            [0xcb, 0x43, 0xe0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn strings_lists_and_maps() {
        assert_eq!(Value::from("tcg").encode(), b"\xa3tcg");
        let s31 = "a".repeat(31);
        assert_eq!(Value::from(s31.as_str()).encode()[0], 0xbf);
        let s32 = "a".repeat(32);
        assert_eq!(Value::from(s32.as_str()).encode()[..2], [0xd9, 32]);
        let s256 = "a".repeat(256);
        assert_eq!(Value::from(s256.as_str()).encode()[..3], [0xda, 1, 0]);
        assert_eq!(Value::list(["-x"]).encode(), b"\x91\xa2-x");
        assert_eq!(Value::List(vec![]).encode(), [0x90]);
        let sixteen = Value::List((0..16).map(Value::Int).collect());
        assert_eq!(sixteen.encode()[..3], [0xdc, 0x00, 0x10]);
        // port_map = [{ http = 8080 }]
        let pm = Value::List(vec![Value::map([("http", Value::Int(8080))])]);
        assert_eq!(pm.encode(), b"\x91\x81\xa4http\xcd\x1f\x90");
        let m = Value::map([("b", Value::Int(1)), ("a", Value::Int(2))]);
        assert_eq!(m.encode(), b"\x82\xa1a\x02\xa1b\x01");
    }

    #[test]
    fn object_keys_are_sorted_bytewise() {
        // Upper case sorts before lower case, and a prefix before longer
        // keys: byte order, not a locale's.
        let o = object(&["b", "a_b", "a", "B", "ab"], []);
        assert_eq!(
            o.encode(),
            b"\x85\xa1B\xc0\xa1a\xc0\xa3a_b\xc0\xa2ab\xc0\xa1b\xc0".to_vec()
        );
    }

    #[test]
    fn a_task_config_holds_all_sixteen_attributes_nil_when_unset() {
        let bytes = task_config([("accelerator", Value::from("tcg"))]).encode();
        let mut expected = vec![0xde, 0x00, 0x10];
        let mut names = TASK_ATTRIBUTES.to_vec();
        names.sort();
        for name in names {
            encode_str(name, &mut expected);
            if name == "accelerator" {
                expected.extend_from_slice(b"\xa3tcg");
            } else {
                expected.push(0xc0);
            }
        }
        assert_eq!(bytes, expected);
        // The first keys, by hand, to pin the order down.
        assert_eq!(
            bytes[3..35],
            *b"\xabaccelerator\xa3tcg\xa4args\xc0\xa8checksum\xc0"
        );
    }

    #[test]
    fn decodes_as_a_generic_msgpack_reader_sees_it() {
        let v = task_config([
            ("image_source", Value::from("http://127.0.0.1:1/guest.iso")),
            ("host_port", Value::Int(20000)),
            (
                "port_map",
                Value::List(vec![Value::map([("http", Value::Int(8080))])]),
            ),
            ("args", Value::list(["-nodefaults"])),
            ("graceful_shutdown", Value::Bool(true)),
        ]);
        let decoded = rmpv::decode::read_value(&mut v.encode().as_slice()).unwrap();
        let map = decoded.as_map().unwrap();
        assert_eq!(map.len(), 16);
        let get = |k: &str| {
            map.iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("host_port").as_u64(), Some(20000));
        assert_eq!(get("image_path"), rmpv::Value::Nil);
        assert_eq!(get("graceful_shutdown").as_bool(), Some(true));
        assert_eq!(get("args")[0].as_str(), Some("-nodefaults"));
        assert_eq!(get("port_map")[0]["http"].as_u64(), Some(8080));
    }

    #[test]
    fn a_plugin_config_has_an_empty_policy_list_when_no_block_is_set() {
        let bytes = plugin_config([], vec![]).encode();
        assert_eq!(
            bytes,
            b"\x85\xa9cache_dir\xc0\xa6config\xc0\xb4fingerprint_period_s\xc0\xa6policy\x90\xa9state_dir\xc0"
                .to_vec()
        );
        let with_policy = plugin_config(
            [("fingerprint_period_s", Value::Int(1))],
            vec![policy_block([
                ("module", Value::from("/p.wasm")),
                ("time_ms", Value::Int(500)),
            ])],
        );
        let decoded = rmpv::decode::read_value(&mut with_policy.encode().as_slice()).unwrap();
        assert_eq!(decoded["fingerprint_period_s"].as_u64(), Some(1));
        let policy = &decoded["policy"][0];
        assert_eq!(policy.as_map().unwrap().len(), 5);
        assert_eq!(policy["module"].as_str(), Some("/p.wasm"));
        assert_eq!(policy["time_ms"].as_u64(), Some(500));
        assert!(policy["settings"].is_nil());
    }

    #[test]
    #[should_panic(expected = "\"bogus\" is not an attribute")]
    fn a_name_outside_the_schema_is_refused_by_the_builder() {
        task_config([("bogus", Value::Int(1))]);
    }

    #[test]
    fn with_adds_a_key_outside_the_schema_in_order() {
        let v = object(&["b"], []).with("a", Value::Int(1));
        assert_eq!(v.encode(), b"\x82\xa1a\x01\xa1b\xc0");
    }

    /// Bytes written by go-cty itself (`cty/msgpack.Marshal`, go-cty
    /// 1.12.1 as Debian 12 packages it) for the same values: produced by
    /// `cty_golden.go` next to this file, which says how to run it.
    mod golden {
        use super::*;

        fn check(value: Value, hex_bytes: &str) {
            assert_eq!(hex::encode(value.encode()), hex_bytes, "{value:?}");
        }

        #[test]
        fn numbers_as_go_cty_writes_them() {
            let ints: &[(i64, &str)] = &[
                (0, "00"),
                (127, "7f"),
                (128, "cc80"),
                (255, "ccff"),
                (256, "cd0100"),
                (65535, "cdffff"),
                (65536, "ce00010000"),
                (4294967295, "ceffffffff"),
                (4294967296, "cf0000000100000000"),
                (i64::MAX, "cf7fffffffffffffff"),
                (-1, "ff"),
                (-32, "e0"),
                (-33, "d0df"),
                (-128, "d080"),
                (-129, "d1ff7f"),
                (-32768, "d18000"),
                (-32769, "d2ffff7fff"),
                (-2147483648, "d280000000"),
                (-2147483649, "d3ffffffff7fffffff"),
                (i64::MIN, "d38000000000000000"),
            ];
            for (n, hex_bytes) in ints {
                check(Value::Int(*n), hex_bytes);
            }
            check(Value::Float(256.0), "cd0100");
            check(Value::Float(-40.0), "d0d8");
            check(Value::Float(1.5), "cb3ff8000000000000");
            check(Value::Float(0.25), "cb3fd0000000000000");
            check(
                Value::Float(9_223_372_036_854_775_808.0),
                "cb43e0000000000000",
            );
            check(
                Value::Float(18_446_744_073_709_551_616.0),
                "cb43f0000000000000",
            );
        }

        #[test]
        fn strings_as_go_cty_writes_them() {
            check(
                Value::from("a".repeat(31)),
                &format!("bf{}", "61".repeat(31)),
            );
            check(
                Value::from("a".repeat(32)),
                &format!("d920{}", "61".repeat(32)),
            );
            check(
                Value::from("a".repeat(256)),
                &format!("da0100{}", "61".repeat(256)),
            );
        }

        #[test]
        fn task_configs_as_go_cty_writes_them() {
            check(
                task_config([("accelerator", Value::from("tcg"))]),
                "de0010ab616363656c657261746f72a3746367a461726773c0a8636865636b73756dc0af64726976655f696e74657266616365c0a8656d756c61746f72c0b1677261636566756c5f73687574646f776ec0aa67756573745f706f7274c0a9686f73745f706f7274c0aa696d6167655f70617468c0ac696d6167655f736f75726365c0ac6b766d5f66616c6c6261636bc0ac6d616368696e655f74797065c0a8706f72745f6d6170c0ab72656164795f636865636bc0ac72656164795f73657269616cc0af72656164795f74696d656f75745f73c0",
            );
            check(
                task_config([
                    (
                        "image_source",
                        Value::from("http://127.0.0.1:8000/guest.iso"),
                    ),
                    (
                        "checksum",
                        Value::from("md5:0123456789abcdef0123456789abcdef"),
                    ),
                    ("accelerator", Value::from("tcg")),
                    ("kvm_fallback", Value::Bool(false)),
                    ("host_port", Value::Int(20000)),
                    ("guest_port", Value::Int(8080)),
                    (
                        "port_map",
                        Value::List(vec![Value::map([
                            ("http", Value::Int(8080)),
                            ("admin", Value::Int(8081)),
                        ])]),
                    ),
                    ("graceful_shutdown", Value::Bool(true)),
                    ("args", Value::list(["-nodefaults", "-no-user-config"])),
                    ("ready_timeout_s", Value::Int(280)),
                ]),
                "de0010ab616363656c657261746f72a3746367a46172677392ab2d6e6f64656661756c7473af2d6e6f2d757365722d636f6e666967a8636865636b73756dd9246d64353a3031323334353637383961626364656630313233343536373839616263646566af64726976655f696e74657266616365c0a8656d756c61746f72c0b1677261636566756c5f73687574646f776ec3aa67756573745f706f7274cd1f90a9686f73745f706f7274cd4e20aa696d6167655f70617468c0ac696d6167655f736f75726365bf687474703a2f2f3132372e302e302e313a383030302f67756573742e69736fac6b766d5f66616c6c6261636bc2ac6d616368696e655f74797065c0a8706f72745f6d61709182a561646d696ecd1f91a468747470cd1f90ab72656164795f636865636bc0ac72656164795f73657269616cc0af72656164795f74696d656f75745f73cd0118",
            );
        }

        #[test]
        fn plugin_configs_as_go_cty_writes_them() {
            check(
                plugin_config([], vec![]),
                "85a963616368655f646972c0a6636f6e666967c0b466696e6765727072696e745f706572696f645f73c0a6706f6c69637990a973746174655f646972c0",
            );
            check(
                plugin_config(
                    [
                        ("config", Value::from("/etc/qemu-executor.toml")),
                        ("fingerprint_period_s", Value::Int(1)),
                    ],
                    vec![policy_block([
                        ("module", Value::from("/p.wasm")),
                        ("settings", Value::from(r#"{"min":1024}"#)),
                        ("time_ms", Value::Int(500)),
                    ])],
                ),
                "85a963616368655f646972c0a6636f6e666967b72f6574632f71656d752d6578656375746f722e746f6d6cb466696e6765727072696e745f706572696f645f7301a6706f6c6963799185a96d656d6f72795f6d62c0a66d6f64756c65a72f702e7761736da873657474696e6773ac7b226d696e223a313032347da6736861323536c0a774696d655f6d73cd01f4a973746174655f646972c0",
            );
        }
    }
}
