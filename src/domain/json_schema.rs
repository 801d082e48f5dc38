//! JSON Schemas of the files people write (policies, inventories, the realm
//! model, the configuration), generated from the types that read them.

use serde_json::Value;

/// The draft-07 schema of `T`: draft-07 is what editors validate YAML with
/// (yaml-language-server) and what taplo reads for TOML. `Option` fields are
/// optional but never null: the loaders refuse null values, so `null` is taken
/// out of every type the generator allowed it in.
pub fn draft07<T: schemars::JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<T>().to_value();
    forbid_null(&mut schema);
    schema
}

/// Marks a schema whose `null` the loader does accept (a mapping written as
/// `key:` with nothing after it): [`forbid_null`] leaves it, and drops the mark.
pub const NULL_ALLOWED: &str = "x-null-allowed";

/// A mapping of `V` by name that may also be written empty (`key:`).
pub fn nullable_map<V: schemars::JsonSchema>(
    g: &mut schemars::SchemaGenerator,
) -> schemars::Schema {
    let values = g.subschema_for::<V>();
    schemars::json_schema!({
        "type": ["object", "null"],
        "additionalProperties": values,
        NULL_ALLOWED: true
    })
}

/// Removes `null` from `type` lists and `{"type": "null"}` from `anyOf`s, below `v`.
fn forbid_null(v: &mut Value) {
    match v {
        Value::Object(map) if map.contains_key(NULL_ALLOWED) => {
            map.remove(NULL_ALLOWED);
            map.values_mut().for_each(forbid_null);
        }
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    map.insert("type".into(), only);
                }
            }
            if let Some(Value::Array(any)) = map.get_mut("anyOf") {
                any.retain(|s| s.get("type").and_then(Value::as_str) != Some("null"));
                if any.len() == 1 {
                    let only = any.remove(0);
                    map.remove("anyOf");
                    if let Value::Object(inner) = only {
                        for (k, val) in inner {
                            map.entry(k).or_insert(val);
                        }
                    }
                }
            }
            if map.get("default") == Some(&Value::Null) {
                map.remove("default");
            }
            map.values_mut().for_each(forbid_null);
        }
        Value::Array(items) => items.iter_mut().for_each(forbid_null),
        _ => {}
    }
}
