//! What a registered value says: the endpoint it names.

use std::sync::Arc;

use crate::Endpoint;

/// A parser of registered values of your own: the key and its value in, the endpoint out, or
/// why the value names none (logged with the key; the key is skipped).
///
/// ```
/// use std::sync::Arc;
/// use grpc_pool::etcd::ParseValue;
/// use grpc_pool::Endpoint;
///
/// // Values are `host port`, TLS always.
/// let parse: ParseValue = Arc::new(|_key: &str, value: &[u8]| {
///     let text = std::str::from_utf8(value).map_err(|e| e.to_string())?;
///     let (host, port) = text.split_once(' ').ok_or("expected `host port`")?;
///     Endpoint::parse(&format!("https://{host}:{port}")).map_err(|e| e.to_string())
/// });
/// assert_eq!(parse("k", b"10.0.0.7 443").unwrap().to_string(), "https://10.0.0.7:443");
/// ```
pub type ParseValue = Arc<dyn Fn(&str, &[u8]) -> Result<Endpoint, String> + Send + Sync>;

/// The default reading of a registered value: etcd's naming convention (the JSON of
/// grpc-go's `endpoints.Endpoint`, `{"Addr": "host:port", "Metadata": ...}`, whose
/// `Metadata` is ignored), a plain `host:port`, or an endpoint URI (`http://`, `https://`,
/// `unix://`). A `host:port` is `http://host:port`.
///
/// ```
/// use grpc_pool::etcd::parse_value;
/// assert_eq!(parse_value(br#"{"Addr":"10.0.0.7:50051","Metadata":{"zone":"a"}}"#).unwrap().to_string(), "http://10.0.0.7:50051");
/// assert_eq!(parse_value(b"10.0.0.7:50051").unwrap().to_string(), "http://10.0.0.7:50051");
/// assert_eq!(parse_value(b"https://orders.internal:443").unwrap().to_string(), "https://orders.internal:443");
/// assert!(parse_value(br#"{"Metadata":1}"#).unwrap_err().contains("Addr"));
/// assert!(parse_value(b"ftp://10.0.0.7:21").unwrap_err().contains("scheme"));
/// ```
pub fn parse_value(value: &[u8]) -> Result<Endpoint, String> {
    let text = std::str::from_utf8(value).map_err(|_| "not UTF-8".to_owned())?.trim();
    if text.is_empty() {
        return Err("empty value".to_owned());
    }
    let address = if text.starts_with('{') {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON ({e}), nor `host:port`, nor a URI"))?;
        match json.get("Addr") {
            Some(serde_json::Value::String(addr)) if !addr.trim().is_empty() => addr.trim().to_owned(),
            Some(_) => return Err("`Addr` is not a non-empty string".to_owned()),
            None => return Err("JSON without an `Addr` field (etcd's naming convention)".to_owned()),
        }
    } else {
        text.to_owned()
    };
    let uri = if address.contains("://") { address } else { format!("http://{address}") };
    Endpoint::parse(&uri).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_say_why() {
        for (value, why) in [
            (&b"not json {"[..], "port"),
            (b"{\"Addr\": 7}", "Addr"),
            (b"{not json", "not JSON"),
            (b"", "empty"),
            (b"\xff\xfe", "UTF-8"),
            (b"gopher://h:1", "scheme"),
        ] {
            let err = parse_value(value).unwrap_err();
            assert!(err.contains(why), "{value:?}: {err}");
        }
    }
}
