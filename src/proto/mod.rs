//! The generated protobuf types and their conversions to and from the domain.
//!
//! A profile is a map of top-level fields. In the domain a field is a BSON value
//! (the form MongoDB stores); on the wire each field is a `google.protobuf.Any`:
//!
//! | domain (BSON)        | wire (`Any` of)                  |
//! |----------------------|----------------------------------|
//! | String               | `google.protobuf.StringValue`    |
//! | Int32 / Int64        | `google.protobuf.Int64Value`     |
//! | Double               | `google.protobuf.DoubleValue`    |
//! | Boolean              | `google.protobuf.BoolValue`      |
//! | Binary               | `google.protobuf.BytesValue`     |
//! | Null                 | `google.protobuf.Value` (null)   |
//! | Document             | `google.protobuf.Struct`         |
//! | Array                | `google.protobuf.ListValue`      |
//!
//! Numbers nested inside a Struct or ListValue travel as doubles (the only number
//! `google.protobuf.Value` has); on decoding, a nested whole number of magnitude
//! below 2^53 comes back as Int64. Decoding rejects any other type URL.

use mongodb::bson::{self, Bson, Document, spec::BinarySubtype};
use prost::Message;
use prost_types::{Any, ListValue, Struct, Value, value::Kind};
use std::collections::HashMap;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/datasync.v1.rs"));
}

pub use v1::{DlqMessage, ErrorContext, SyncType, UserProfileSyncEvent};

/// A profile field that cannot be packed or unpacked.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtoError {
    #[error("field `{field}`: unsupported type URL `{type_url}`")]
    UnknownType { field: String, type_url: String },
    #[error("field `{field}`: cannot decode {type_url}: {reason}")]
    Decode {
        field: String,
        type_url: String,
        reason: String,
    },
    #[error("field `{field}`: BSON type {bson_type} has no protobuf packing")]
    Unsupported { field: String, bson_type: String },
    #[error("cannot decode event: {0}")]
    Event(String),
}

const MAX_SAFE_INT: f64 = 9_007_199_254_740_992.0; // 2^53

fn url_of<M: WellKnown>() -> String {
    M::URL.to_string()
}

/// The well-known types of the packing convention, by their type URLs.
trait WellKnown: Message + Default {
    const URL: &'static str;
}

macro_rules! well_known {
    ($($t:ty => $name:literal),* $(,)?) => {$(
        impl WellKnown for $t {
            const URL: &'static str = concat!("type.googleapis.com/google.protobuf.", $name);
        }
    )*};
}

well_known! {
    String => "StringValue",
    i64 => "Int64Value",
    f64 => "DoubleValue",
    bool => "BoolValue",
    Vec<u8> => "BytesValue",
    Value => "Value",
    Struct => "Struct",
    ListValue => "ListValue",
}

fn to_any<M: WellKnown>(m: &M) -> Any {
    Any {
        type_url: url_of::<M>(),
        value: m.encode_to_vec(),
    }
}

fn from_any<M: WellKnown>(any: &Any) -> Result<M, prost::DecodeError> {
    M::decode(any.value.as_slice())
}

/// Packs one domain value into an `Any`.
pub fn pack(field: &str, v: &Bson) -> Result<Any, ProtoError> {
    Ok(match v {
        Bson::String(s) => to_any(s),
        Bson::Int32(i) => to_any(&i64::from(*i)),
        Bson::Int64(i) => to_any(i),
        Bson::Double(d) => to_any(d),
        Bson::Boolean(b) => to_any(b),
        Bson::Binary(b) => to_any(&b.bytes),
        Bson::Null => to_any(&Value {
            kind: Some(Kind::NullValue(0)),
        }),
        Bson::Document(d) => to_any(&to_struct(field, d)?),
        Bson::Array(a) => to_any(&to_list(field, a)?),
        other => {
            return Err(ProtoError::Unsupported {
                field: field.to_string(),
                bson_type: format!("{:?}", other.element_type()),
            });
        }
    })
}

/// Unpacks one `Any` into a domain value.
pub fn unpack(field: &str, any: &Any) -> Result<Bson, ProtoError> {
    let err = |reason: prost::DecodeError| ProtoError::Decode {
        field: field.to_string(),
        type_url: any.type_url.clone(),
        reason: reason.to_string(),
    };
    let url = any.type_url.as_str();
    Ok(if url == String::URL {
        Bson::String(from_any::<String>(any).map_err(err)?)
    } else if url == i64::URL {
        Bson::Int64(from_any::<i64>(any).map_err(err)?)
    } else if url == f64::URL {
        Bson::Double(from_any::<f64>(any).map_err(err)?)
    } else if url == bool::URL {
        Bson::Boolean(from_any::<bool>(any).map_err(err)?)
    } else if url == <Vec<u8>>::URL {
        Bson::Binary(bson::Binary {
            subtype: BinarySubtype::Generic,
            bytes: from_any::<Vec<u8>>(any).map_err(err)?,
        })
    } else if url == Value::URL {
        from_value(&from_any::<Value>(any).map_err(err)?)
    } else if url == Struct::URL {
        Bson::Document(from_struct(&from_any::<Struct>(any).map_err(err)?))
    } else if url == ListValue::URL {
        Bson::Array(from_list(&from_any::<ListValue>(any).map_err(err)?))
    } else {
        return Err(ProtoError::UnknownType {
            field: field.to_string(),
            type_url: any.type_url.clone(),
        });
    })
}

/// Packs a whole profile.
pub fn pack_profile(doc: &Document) -> Result<HashMap<String, Any>, ProtoError> {
    doc.iter()
        .map(|(k, v)| Ok((k.clone(), pack(k, v)?)))
        .collect()
}

/// Unpacks a whole profile, with fields in name order (maps have no order).
pub fn unpack_profile(map: &HashMap<String, Any>) -> Result<Document, ProtoError> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let mut doc = Document::new();
    for k in keys {
        doc.insert(k.clone(), unpack(k, &map[k])?);
    }
    Ok(doc)
}

/// A profile as the upstream writes it: a JSON object.
pub type JsonProfile = serde_json::Map<String, serde_json::Value>;

/// Packs a JSON profile straight into its wire form: the same `Any`s as
/// [`pack_profile`] of its [`json_to_bson`] conversion, without building the
/// BSON document in between (the publish path's form). Every JSON value has
/// a packing, so this cannot fail.
pub fn pack_json_profile(profile: &JsonProfile) -> HashMap<String, Any> {
    profile
        .iter()
        .map(|(k, v)| (k.clone(), pack_json(v)))
        .collect()
}

/// Packs one JSON value: integers as Int64Value, other numbers as
/// DoubleValue, as [`json_to_bson`] then [`pack`] would.
pub fn pack_json(v: &serde_json::Value) -> Any {
    use serde_json::Value as J;
    match v {
        J::Null => to_any(&Value {
            kind: Some(Kind::NullValue(0)),
        }),
        J::Bool(b) => to_any(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => to_any(&i),
            None => to_any(&n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => to_any(s),
        J::Array(a) => to_any(&json_list(a)),
        J::Object(o) => to_any(&json_struct(o)),
    }
}

fn json_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(json_list(a)),
        J::Object(o) => Kind::StructValue(json_struct(o)),
    };
    Value { kind: Some(kind) }
}

fn json_struct(o: &JsonProfile) -> Struct {
    Struct {
        fields: o.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
    }
}

fn json_list(a: &[serde_json::Value]) -> ListValue {
    ListValue {
        values: a.iter().map(json_value).collect(),
    }
}

/// Converts a JSON value to BSON: integers become Int64 (never Int32, never a
/// lossy double), other numbers Double.
pub fn json_to_bson(v: &serde_json::Value) -> Bson {
    use serde_json::Value as J;
    match v {
        J::Null => Bson::Null,
        J::Bool(b) => Bson::Boolean(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Bson::Int64(i),
            None => Bson::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Bson::String(s.clone()),
        J::Array(a) => Bson::Array(a.iter().map(json_to_bson).collect()),
        J::Object(o) => Bson::Document(
            o.iter()
                .map(|(k, v)| (k.clone(), json_to_bson(v)))
                .collect(),
        ),
    }
}

/// A document as a JSON object (see [`bson_to_json`]).
pub fn document_to_json(d: &Document) -> serde_json::Value {
    serde_json::Value::Object(
        d.iter()
            .map(|(k, v)| (k.clone(), bson_to_json(v)))
            .collect(),
    )
}

/// Converts BSON back to JSON for API answers (binary as an array of bytes).
pub fn bson_to_json(v: &Bson) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Bson::Null => J::Null,
        Bson::Boolean(b) => J::Bool(*b),
        Bson::Int32(i) => J::from(*i),
        Bson::Int64(i) => J::from(*i),
        Bson::Double(d) => serde_json::Number::from_f64(*d)
            .map(J::Number)
            .unwrap_or(J::Null),
        Bson::String(s) => J::String(s.clone()),
        Bson::Array(a) => J::Array(a.iter().map(bson_to_json).collect()),
        Bson::Document(d) => document_to_json(d),
        other => other.clone().into_relaxed_extjson(),
    }
}

fn to_value(field: &str, v: &Bson) -> Result<Value, ProtoError> {
    let kind = match v {
        Bson::Null => Kind::NullValue(0),
        Bson::Boolean(b) => Kind::BoolValue(*b),
        Bson::Int32(i) => Kind::NumberValue(f64::from(*i)),
        Bson::Int64(i) => Kind::NumberValue(*i as f64),
        Bson::Double(d) => Kind::NumberValue(*d),
        Bson::String(s) => Kind::StringValue(s.clone()),
        Bson::Document(d) => Kind::StructValue(to_struct(field, d)?),
        Bson::Array(a) => Kind::ListValue(to_list(field, a)?),
        other => {
            return Err(ProtoError::Unsupported {
                field: field.to_string(),
                bson_type: format!("{:?} (inside an object or array)", other.element_type()),
            });
        }
    };
    Ok(Value { kind: Some(kind) })
}

fn to_struct(field: &str, d: &Document) -> Result<Struct, ProtoError> {
    let fields = d
        .iter()
        .map(|(k, v)| Ok((k.clone(), to_value(field, v)?)))
        .collect::<Result<_, ProtoError>>()?;
    Ok(Struct { fields })
}

fn to_list(field: &str, a: &[Bson]) -> Result<ListValue, ProtoError> {
    Ok(ListValue {
        values: a
            .iter()
            .map(|v| to_value(field, v))
            .collect::<Result<_, _>>()?,
    })
}

fn from_value(v: &Value) -> Bson {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Bson::Null,
        Some(Kind::BoolValue(b)) => Bson::Boolean(*b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < MAX_SAFE_INT {
                Bson::Int64(*n as i64)
            } else {
                Bson::Double(*n)
            }
        }
        Some(Kind::StringValue(s)) => Bson::String(s.clone()),
        Some(Kind::StructValue(s)) => Bson::Document(from_struct(s)),
        Some(Kind::ListValue(l)) => Bson::Array(from_list(l)),
    }
}

fn from_struct(s: &Struct) -> Document {
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| (k.clone(), from_value(&s.fields[k])))
        .collect()
}

fn from_list(l: &ListValue) -> Vec<Bson> {
    l.values.iter().map(from_value).collect()
}

impl UserProfileSyncEvent {
    /// Decodes an event from Kafka bytes.
    pub fn decode_bytes(bytes: &[u8]) -> Result<Self, ProtoError> {
        Self::decode(bytes).map_err(|e| ProtoError::Event(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    fn round_trip(v: Bson) -> Bson {
        let any = pack("f", &v).unwrap();
        // Through the wire as bytes too.
        let bytes = any.encode_to_vec();
        let any = Any::decode(bytes.as_slice()).unwrap();
        unpack("f", &any).unwrap()
    }

    #[test]
    fn scalars_round_trip() {
        for v in [
            Bson::String("张三".into()),
            Bson::Int64((1i64 << 53) + 1),
            Bson::Int64(i64::MIN),
            Bson::Double(0.1),
            Bson::Boolean(true),
            Bson::Binary(bson::Binary {
                subtype: BinarySubtype::Generic,
                bytes: vec![0, 255, 7],
            }),
            Bson::Null,
        ] {
            assert_eq!(round_trip(v.clone()), v);
        }
    }

    #[test]
    fn int32_widens_to_int64() {
        assert_eq!(round_trip(Bson::Int32(5)), Bson::Int64(5));
    }

    #[test]
    fn objects_and_arrays_round_trip() {
        let nested = Bson::Document(doc! { "a": { "b": [1i64, 2.5, "x", null, true] }, "c": [] });
        assert_eq!(round_trip(nested.clone()), nested);
        let arr = Bson::Array(vec![Bson::Document(doc! {"k": "v"}), Bson::Array(vec![])]);
        assert_eq!(round_trip(arr.clone()), arr);
    }

    #[test]
    fn type_urls_follow_the_convention() {
        assert_eq!(
            pack("f", &Bson::String("x".into())).unwrap().type_url,
            "type.googleapis.com/google.protobuf.StringValue"
        );
        assert_eq!(
            pack("f", &Bson::Int64(1)).unwrap().type_url,
            "type.googleapis.com/google.protobuf.Int64Value"
        );
        assert_eq!(
            pack("f", &Bson::Document(doc! {})).unwrap().type_url,
            "type.googleapis.com/google.protobuf.Struct"
        );
    }

    #[test]
    fn unknown_type_url_is_a_clear_error() {
        let any = Any {
            type_url: "type.googleapis.com/acme.Mystery".into(),
            value: vec![1, 2, 3],
        };
        let err = unpack("vip", &any).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `vip`: unsupported type URL `type.googleapis.com/acme.Mystery`"
        );
    }

    #[test]
    fn corrupt_payload_is_a_clear_error() {
        let any = Any {
            type_url: url_of::<String>(),
            value: vec![0xff, 0xff],
        };
        assert!(matches!(
            unpack("name", &any),
            Err(ProtoError::Decode { .. })
        ));
    }

    #[test]
    fn json_packs_as_its_bson_conversion_does() {
        let json = serde_json::json!({
            "name": "张三", "age": 25, "neg": -3, "big": 9007199254740993i64,
            "huge": 18446744073709551615u64, "score": 1.5, "vip": false, "none": null,
            "tags": ["a", 2, 2.5, null, true, {"k": [1]}], "addr": {"city": "X", "n": 7, "in": {}},
            "empty": [], "nested_big": [9007199254740993i64]
        });
        let serde_json::Value::Object(obj) = &json else {
            panic!()
        };
        let Bson::Document(doc) = json_to_bson(&json) else {
            panic!()
        };
        let direct = pack_json_profile(obj);
        let via_bson = pack_profile(&doc).unwrap();
        assert_eq!(direct.len(), via_bson.len());
        for (k, any) in &via_bson {
            let d = &direct[k];
            assert_eq!(d.type_url, any.type_url, "{k}");
            // Struct fields are a map: compare decoded, not bytes.
            assert_eq!(unpack(k, d).unwrap(), unpack(k, any).unwrap(), "{k}");
        }
    }

    #[test]
    fn whole_profile_round_trips_through_an_event() {
        let json: serde_json::Value = serde_json::json!({
            "name": "Ann", "age": 25, "big": 9007199254740993i64, "score": 1.5,
            "vip": false, "tags": ["a", "b"], "addr": {"city": "X"}, "none": null
        });
        let Bson::Document(profile) = json_to_bson(&json) else {
            panic!()
        };
        let event = UserProfileSyncEvent {
            user_id: "u1".into(),
            sync_type: SyncType::DynamicBatch as i32,
            profile_data: pack_profile(&profile).unwrap(),
            version: 42,
            ..Default::default()
        };
        let decoded = UserProfileSyncEvent::decode_bytes(&event.encode_to_vec()).unwrap();
        let back = unpack_profile(&decoded.profile_data).unwrap();
        assert_eq!(bson_to_json(&Bson::Document(back)), json);
    }
}
