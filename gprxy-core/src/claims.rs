//! Claim access: strict JSON, claim paths, roles and scopes.
//!
//! JSON here is parsed strictly: duplicate object keys are refused at every depth (RFC 7515
//! section 5.2 lets a validator refuse them, and two parsers that pick different duplicates are
//! a known way to smuggle claims).

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::Malformed;

const DUPLICATE_KEY: &str = "gprxy: duplicate key";

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(DUPLICATE_KEY));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses `bytes` as a JSON object, refusing duplicate keys at any depth.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, Malformed> {
    match serde_json::from_slice::<StrictValue>(bytes) {
        Ok(StrictValue(Value::Object(m))) => Ok(m),
        Ok(_) => Err(Malformed::NotObject),
        Err(e) if e.to_string().starts_with(DUPLICATE_KEY) => Err(Malformed::DuplicateKey),
        Err(_) => Err(Malformed::Json),
    }
}

/// Where a claim lives: an exact claim name (`https://gprxy.io/roles`), or failing that a dotted
/// path into nested objects (`realm_access.roles`). Keys may themselves contain dots
/// (`kubernetes.io.namespace` finds `{"kubernetes.io": {"namespace": ..}}`): at each level the
/// whole rest is tried as a key first, then each split point from the left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath {
    raw: String,
}

/// Deepest nesting a claim path may reach.
const MAX_PATH_DEPTH: usize = 8;

impl ClaimPath {
    /// Parses a claim name or dotted path.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err("claim name must not be empty");
        }
        if raw.len() > 256 {
            return Err("claim name longer than 256 bytes");
        }
        Ok(Self { raw: raw.to_owned() })
    }

    /// The name as configured.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Finds the claim.
    pub fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        lookup_in(claims, &self.raw, MAX_PATH_DEPTH)
    }
}

fn lookup_in<'a>(obj: &'a Map<String, Value>, path: &str, depth: usize) -> Option<&'a Value> {
    if let Some(v) = obj.get(path) {
        return Some(v);
    }
    if depth == 0 {
        return None;
    }
    path.match_indices('.').find_map(|(i, _)| {
        let inner = obj.get(&path[..i])?.as_object()?;
        lookup_in(inner, &path[i + 1..], depth - 1)
    })
}

/// A claim value as a list of strings: an array of strings (other entries ignored), or one
/// string split on commas and whitespace.
pub fn string_list(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => {
            items.iter().filter_map(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned).collect()
        }
        Some(Value::String(s)) => s
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// The scopes a token grants: `scope` (space-separated, RFC 8693/9068) and `scp` (Entra ID, Okta:
/// a string or an array).
pub fn granted_scopes(claims: &Map<String, Value>) -> Vec<String> {
    let mut scopes = match claims.get("scope") {
        Some(v @ Value::String(_)) => scopes_of(Some(v)),
        _ => Vec::new(),
    };
    scopes.extend(scopes_of(claims.get("scp")));
    scopes
}

/// The scopes one claim grants: a space-separated string, or an array of strings.
pub fn scopes_of(claim: Option<&Value>) -> Vec<String> {
    match claim {
        Some(Value::String(s)) => s.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        Some(v @ Value::Array(_)) => string_list(Some(v)),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn duplicate_keys_refused_at_any_depth() {
        assert_eq!(parse_object(br#"{"a":1,"a":2}"#), Err(Malformed::DuplicateKey));
        assert_eq!(parse_object(br#"{"a":{"b":1,"b":1}}"#), Err(Malformed::DuplicateKey));
        assert_eq!(parse_object(br#"{"a":[{"b":1,"b":1}]}"#), Err(Malformed::DuplicateKey));
        assert_eq!(parse_object(br#"[1]"#), Err(Malformed::NotObject));
        assert_eq!(parse_object(br#"{"a":1"#), Err(Malformed::Json));
        assert_eq!(parse_object(b"{\"a\":\"\xff\"}"), Err(Malformed::Json));
        assert_eq!(parse_object(br#"{"a":1,"b":{"a":1}}"#).unwrap().len(), 2);
    }

    #[test]
    fn claim_paths_exact_name_first() {
        let c = json!({"https://gprxy.io/roles": ["a"], "realm_access": {"roles": ["b", "c"]},
                       "realm_access.roles": "x"});
        let c = c.as_object().unwrap();
        let p = ClaimPath::parse("https://gprxy.io/roles").unwrap();
        assert_eq!(string_list(p.lookup(c)), vec!["a"]);
        // The exact key wins over the path.
        let p = ClaimPath::parse("realm_access.roles").unwrap();
        assert_eq!(string_list(p.lookup(c)), vec!["x"]);
        let c2 = json!({"realm_access": {"roles": ["b", "c"]}});
        assert_eq!(string_list(p.lookup(c2.as_object().unwrap())), vec!["b", "c"]);
        assert_eq!(ClaimPath::parse("  "), Err("claim name must not be empty"));
    }

    #[test]
    fn roles_from_array_or_separated_string() {
        assert_eq!(string_list(Some(&json!("a, b c"))), vec!["a", "b", "c"]);
        assert_eq!(string_list(Some(&json!(["a", 1, "b", ""]))), vec!["a", "b"]);
        assert!(string_list(Some(&json!(5))).is_empty());
    }

    #[test]
    fn scopes_from_scope_and_scp() {
        let c = json!({"scope": "openid db:read", "scp": ["db:write"]});
        assert_eq!(granted_scopes(c.as_object().unwrap()), vec!["openid", "db:read", "db:write"]);
        let c = json!({"scp": "a b"});
        assert_eq!(granted_scopes(c.as_object().unwrap()), vec!["a", "b"]);
    }
}
