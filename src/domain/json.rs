//! JSON objects with unique member names.

/// A JSON object whose member names are unique (RFC 7515 §5.2 step 4, RFC 7519
/// §4: duplicate names are rejected rather than "last one wins", so a token can
/// not mean one thing to us and another to the next parser).
pub struct StrictObject(pub serde_json::Map<String, serde_json::Value>);

impl<'de> serde::Deserialize<'de> for StrictObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StrictObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<StrictObject, A::Error> {
                let mut m = serde_json::Map::new();
                while let Some((k, v)) = a.next_entry::<String, serde_json::Value>()? {
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom("duplicate member"));
                    }
                    m.insert(k, v);
                }
                Ok(StrictObject(m))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_members_are_refused() {
        assert!(serde_json::from_str::<StrictObject>(r#"{"a":1,"b":2}"#).is_ok());
        let e = serde_json::from_str::<StrictObject>(r#"{"a":1,"a":2}"#)
            .err()
            .unwrap();
        assert!(e.to_string().contains("duplicate member"));
        assert!(serde_json::from_str::<StrictObject>("[1]").is_err());
    }
}
