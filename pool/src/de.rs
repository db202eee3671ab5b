//! Deserializing the configuration types (cargo feature `serde`): durations written as people
//! write them (`"30s"`, `"1m 30s"`, `"250ms"`), and `"off"` for a setting that can be off.
//! The health crate and the facade use the same functions, so every file reads alike.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

/// The words that turn an optional setting off.
const OFF: [&str; 3] = ["off", "never", "none"];

fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration `{text}` ({e}); write it like \"30s\", \"1m 30s\" or \"250ms\"")
    })
}

/// A duration: `"30s"`, `"1m 30s"`, `"250ms"`, `"2h"`.
pub fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(de::Error::custom)
}

/// A duration, or `"off"` for none.
pub fn optional_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if OFF.contains(&text.trim()) {
        return Ok(None);
    }
    parse(&text).map(Some).map_err(de::Error::custom)
}

/// A section (a table, an object) for `Some`, or `"off"` for `None`: a setting on by default
/// that a file can turn off.
pub fn off_or<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct OffOr<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for OffOr<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table of settings, or \"off\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Option<T>, E> {
            if OFF.contains(&text.trim()) {
                Ok(None)
            } else {
                Err(E::invalid_value(de::Unexpected::Str(text), &self))
            }
        }

        fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Option<T>, M::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }

    deserializer.deserialize_any(OffOr(PhantomData))
}
