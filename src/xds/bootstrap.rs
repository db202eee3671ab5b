//! The xDS bootstrap (gRFC A27): where the control plane is, how to reach it, and who this
//! client is. The same JSON file gRPC's other languages read, so one file serves a fleet.

use std::path::Path;

use serde_json::{Map, Value};

use crate::Error;

/// What the pool needs to reach an xDS control plane: a gRPC xDS bootstrap, as gRFC A27
/// defines it. Read from the file `GRPC_XDS_BOOTSTRAP` names, or the JSON in
/// `GRPC_XDS_BOOTSTRAP_CONFIG` ([`Bootstrap::from_env`]), from a file or a string in code, or
/// from the `[xds]` section of a config file.
///
/// Of the file, the pool reads `xds_servers` (the first server is used: its `server_uri`,
/// a gRPC target such as `localhost:18000` or `dns:///cp.mesh:18000`, and the first of its
/// `channel_creds` that it supports: `insecure`, or `tls`, with the system's roots or, as
/// gRFC A65 has it, the PEM files its `config` names: `ca_certificate_file`, and
/// `certificate_file` with `private_key_file` for mTLS) and
/// `node` (`id`, `cluster`, `locality`, `metadata`: sent to the control plane, which picks
/// the resources by them). `server_features` and the other top-level fields
/// (`certificate_providers`, `authorities`, ...) are read past; a server that has only
/// credentials the pool does not support (`google_default`, ...) is an error.
///
/// ```
/// let bootstrap = grpc_pool::xds::Bootstrap::from_json(r#"{
///     "xds_servers": [{"server_uri": "localhost:18000", "channel_creds": [{"type": "insecure"}]}],
///     "node": {"id": "echo-client-1", "locality": {"zone": "eu-west-1a"}}
/// }"#)?;
/// assert_eq!(bootstrap.server_uri(), "http://localhost:18000");
/// assert_eq!(bootstrap.node_id(), "echo-client-1");
/// # Ok::<(), grpc_pool::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// `http://host:port` or `https://host:port`.
    server_uri: String,
    /// For `https://`, when the `tls` credentials name files (A65).
    tls: Option<crate::TlsConfig>,
    node: Node,
}

/// The `node` of the bootstrap, as sent in the first request of every ADS stream.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Node {
    pub(crate) id: String,
    pub(crate) cluster: String,
    pub(crate) region: String,
    pub(crate) zone: String,
    pub(crate) sub_zone: String,
    pub(crate) metadata: Map<String, Value>,
}

impl Bootstrap {
    /// The bootstrap from the environment, as the other gRPC languages find it: the file
    /// `GRPC_XDS_BOOTSTRAP` names, else the JSON of `GRPC_XDS_BOOTSTRAP_CONFIG`. Fails naming
    /// the variable when neither is set, the file cannot be read, or the JSON is not a
    /// bootstrap.
    pub fn from_env() -> Result<Bootstrap, Error> {
        if let Some(path) = std::env::var_os("GRPC_XDS_BOOTSTRAP") {
            return Bootstrap::from_file(path);
        }
        match std::env::var("GRPC_XDS_BOOTSTRAP_CONFIG") {
            Ok(json) => Bootstrap::from_json(&json),
            Err(_) => Err(Error::invalid_config(
                "GRPC_XDS_BOOTSTRAP",
                "(not set)",
                "the path of an xDS bootstrap file, or its JSON in GRPC_XDS_BOOTSTRAP_CONFIG",
            )),
        }
    }

    /// The bootstrap in the file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Bootstrap, Error> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid_config(
                "xds.bootstrap",
                &format!("{} ({e})", path.display()),
                "a readable bootstrap file",
            )
        })?;
        Bootstrap::from_json(&json)
    }

    /// The bootstrap in `json`. Fails with the field that is wrong (`xds_servers[0].server_uri`,
    /// `node.id`, ...) and what it may be.
    pub fn from_json(json: &str) -> Result<Bootstrap, Error> {
        let value: Value = serde_json::from_str(json).map_err(|e| {
            Error::invalid_config("xds.bootstrap", &format!("({e})"), "a JSON object (gRFC A27's bootstrap)")
        })?;
        let Value::Object(root) = value else {
            return Err(Error::invalid_config("xds.bootstrap", "not an object", "a JSON object"));
        };
        let servers = match root.get("xds_servers") {
            Some(Value::Array(servers)) if !servers.is_empty() => servers,
            other => {
                return Err(Error::invalid_config(
                    "xds_servers",
                    &shown(other),
                    "a list of 1 or more servers ({\"server_uri\": ..., \"channel_creds\": [...]})",
                ))
            }
        };
        let (server_uri, tls) = server(&servers[0])?;
        let node = match root.get("node") {
            None => Node::default(),
            Some(Value::Object(node)) => read_node(node)?,
            Some(other) => return Err(Error::invalid_config("node", &shown(Some(other)), "an object")),
        };
        Ok(Bootstrap { server_uri, tls, node })
    }

    /// The control plane's URI, as the pool connects to it (`http://` for `insecure`
    /// credentials, `https://` for `tls`).
    pub fn server_uri(&self) -> &str {
        &self.server_uri
    }

    /// The node id this client sends.
    pub fn node_id(&self) -> &str {
        &self.node.id
    }

    /// The TLS settings for the control plane's connection, when its `tls` credentials
    /// name files.
    pub(crate) fn tls(&self) -> Option<&crate::TlsConfig> {
        self.tls.as_ref()
    }

    pub(crate) fn node(&self) -> &Node {
        &self.node
    }
}

/// The first server: its URI, with the scheme its credentials call for, and the TLS settings
/// its `tls` credentials name.
fn server(server: &Value) -> Result<(String, Option<crate::TlsConfig>), Error> {
    let Value::Object(server) = server else {
        return Err(Error::invalid_config("xds_servers[0]", &shown(Some(server)), "an object"));
    };
    let target = match server.get("server_uri") {
        Some(Value::String(uri)) if !uri.is_empty() => uri.as_str(),
        other => {
            return Err(Error::invalid_config(
                "xds_servers[0].server_uri",
                &shown(other),
                "a gRPC target: `host:port` or `dns:///host:port`",
            ))
        }
    };
    let creds = match server.get("channel_creds") {
        Some(Value::Array(creds)) if !creds.is_empty() => creds,
        other => {
            return Err(Error::invalid_config(
                "xds_servers[0].channel_creds",
                &shown(other),
                "a list of 1 or more credentials ({\"type\": \"insecure\"} or {\"type\": \"tls\"})",
            ))
        }
    };
    // A27: the first type the client supports is used, the others are read past.
    let (index, scheme) = creds
        .iter()
        .enumerate()
        .find_map(|(i, c)| match c.get("type").and_then(Value::as_str) {
            Some("insecure") => Some((i, "http")),
            Some("tls") => Some((i, "https")),
            _ => None,
        })
        .ok_or_else(|| {
            Error::invalid_config(
                "xds_servers[0].channel_creds",
                &Value::Array(creds.clone()).to_string(),
                "a list with a type this pool supports: `insecure` or `tls`",
            )
        })?;
    // A gRPC target: `host:port`, `dns:host:port`, `dns:///host:port`, `ipv4:...`.
    let authority = ["dns:///", "dns:", "ipv4:", "ipv6:"]
        .iter()
        .find_map(|prefix| target.strip_prefix(prefix))
        .unwrap_or(target);
    if authority.is_empty() || authority.contains('/') || !authority.contains(':') || authority.contains(',')
    {
        return Err(Error::invalid_config(
            "xds_servers[0].server_uri",
            &format!("\"{target}\""),
            "a gRPC target naming one host and its port: `host:port` or `dns:///host:port`",
        ));
    }
    let uri = format!("{scheme}://{authority}");
    crate::Endpoint::parse(&uri).map_err(|e| {
        Error::invalid_config("xds_servers[0].server_uri", &format!("\"{target}\" ({e})"), "`host:port`")
    })?;
    let tls = match creds[index].get("config") {
        Some(Value::Object(config)) if scheme == "https" => Some(tls_files(config, index)?),
        _ => None,
    };
    Ok((uri, tls))
}

/// gRFC A65's `tls` credentials: the PEM files to trust and to present, read now.
fn tls_files(config: &Map<String, Value>, index: usize) -> Result<crate::TlsConfig, Error> {
    let field = |name: &str| format!("xds_servers[0].channel_creds[{index}].config.{name}");
    let read = |name: &str| -> Result<Option<Vec<u8>>, Error> {
        match config.get(name) {
            None => Ok(None),
            Some(Value::String(path)) => std::fs::read(path).map(Some).map_err(|e| {
                Error::invalid_config(&field(name), &format!("{path} ({e})"), "a readable PEM file")
            }),
            Some(other) => Err(Error::invalid_config(&field(name), &other.to_string(), "a file path")),
        }
    };
    let mut tls = crate::TlsConfig::default();
    tls.ca_pem = read("ca_certificate_file")?;
    match (read("certificate_file")?, read("private_key_file")?) {
        (Some(cert), Some(key)) => tls.client_identity = Some(crate::ClientIdentity::new(cert, key)),
        (None, None) => {}
        _ => {
            return Err(Error::invalid_config(
                &field("certificate_file"),
                "(one of certificate_file and private_key_file)",
                "both, or neither",
            ))
        }
    }
    Ok(tls)
}

fn read_node(node: &Map<String, Value>) -> Result<Node, Error> {
    let text = |field: &str, value: Option<&Value>| -> Result<String, Error> {
        match value {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(Error::invalid_config(field, &other.to_string(), "a string")),
        }
    };
    let locality = match node.get("locality") {
        None => Map::new(),
        Some(Value::Object(locality)) => locality.clone(),
        Some(other) => return Err(Error::invalid_config("node.locality", &other.to_string(), "an object")),
    };
    let metadata = match node.get("metadata") {
        None => Map::new(),
        Some(Value::Object(metadata)) => metadata.clone(),
        Some(other) => return Err(Error::invalid_config("node.metadata", &other.to_string(), "an object")),
    };
    Ok(Node {
        id: text("node.id", node.get("id"))?,
        cluster: text("node.cluster", node.get("cluster"))?,
        region: text("node.locality.region", locality.get("region"))?,
        zone: text("node.locality.zone", locality.get("zone"))?,
        sub_zone: text("node.locality.sub_zone", locality.get("sub_zone"))?,
        metadata,
    })
}

fn shown(value: Option<&Value>) -> String {
    value.map_or_else(|| "(missing)".to_owned(), Value::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bootstrap_is_read_with_the_first_credentials_the_pool_supports() {
        let b = Bootstrap::from_json(
            r#"{"xds_servers": [{"server_uri": "dns:///cp.mesh:443",
                "channel_creds": [{"type": "google_default"}, {"type": "tls"}], "server_features": ["xds_v3"]}],
                "node": {"id": "n1", "cluster": "c", "locality": {"region": "r", "zone": "z"}, "metadata": {"k": 1}},
                "certificate_providers": {}}"#,
        )
        .unwrap();
        assert_eq!(b.server_uri(), "https://cp.mesh:443");
        assert_eq!(b.node().id, "n1");
        assert_eq!(b.node().zone, "z");
        assert_eq!(b.node().metadata.get("k"), Some(&Value::from(1)));
    }

    #[test]
    fn a_bad_bootstrap_names_the_field() {
        let cases = [
            ("{}", "`xds_servers`"),
            (r#"{"xds_servers": []}"#, "`xds_servers`"),
            (
                r#"{"xds_servers": [{"channel_creds": [{"type": "insecure"}]}]}"#,
                "`xds_servers[0].server_uri`",
            ),
            (r#"{"xds_servers": [{"server_uri": "a:1"}]}"#, "`xds_servers[0].channel_creds`"),
            (
                r#"{"xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type": "google_default"}]}]}"#,
                "`xds_servers[0].channel_creds`",
            ),
            (
                r#"{"xds_servers": [{"server_uri": "a", "channel_creds": [{"type": "insecure"}]}]}"#,
                "`xds_servers[0].server_uri`",
            ),
            (
                r#"{"xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type": "insecure"}]}], "node": {"id": 7}}"#,
                "`node.id`",
            ),
            ("[", "`xds.bootstrap`"),
        ];
        for (json, field) in cases {
            let err = Bootstrap::from_json(json).unwrap_err().to_string();
            assert!(err.contains(field), "{json}: {err}");
        }
    }
}
