//! Sync bodies (§4) and introspection (§5).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::FunctionConfig;

/// The body of `POST /fn/register` (out-of-band sync).
///
/// Python spells `appName` and `deployType` as `appname` and `deploy_type`; both are read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegisterRequest {
    pub url: String,
    #[serde(rename = "deployType")]
    pub deploy_type: String,
    #[serde(default)]
    pub framework: String,
    #[serde(rename = "appName")]
    pub app_name: String,
    pub functions: Vec<FunctionConfig>,
    pub sdk: String,
    #[serde(default)]
    pub v: String,
    #[serde(rename = "deployId", skip_serializing_if = "Option::is_none")]
    pub deploy_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
    #[serde(rename = "appVersion", skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
}

impl<'de> Deserialize<'de> for RegisterRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // Keys are matched ignoring case and underscores, as the Go server's decoder does.
        let raw = Map::<String, Value>::deserialize(d)?;
        let mut norm: Map<String, Value> = raw
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase().replace('_', ""), v))
            .collect();
        let mut take_str = |k: &str| match norm.remove(k) {
            Some(Value::String(s)) => Ok(Some(s)),
            Some(Value::Null) | None => Ok(None),
            Some(other) => Err(D::Error::custom(format!(
                "`{k}` must be a string, got {other}"
            ))),
        };
        let url = take_str("url")?.ok_or_else(|| D::Error::missing_field("url"))?;
        let app_name = take_str("appname")?.ok_or_else(|| D::Error::missing_field("appName"))?;
        let deploy_type = take_str("deploytype")?.unwrap_or_else(|| "ping".to_string());
        let framework = take_str("framework")?.unwrap_or_default();
        let sdk = take_str("sdk")?.unwrap_or_default();
        let v = take_str("v")?.unwrap_or_default();
        let deploy_id = take_str("deployid")?;
        let app_version = take_str("appversion")?;
        let functions = match norm.remove("functions") {
            Some(Value::Null) | None => Vec::new(),
            Some(f) => serde_json::from_value(f).map_err(D::Error::custom)?,
        };
        let capabilities = norm.remove("capabilities").filter(|v| !v.is_null());
        Ok(RegisterRequest {
            url,
            deploy_type,
            framework,
            app_name,
            functions,
            sdk,
            v,
            deploy_id,
            capabilities,
            app_version,
        })
    }
}

/// The reply to a successful register (§4.2). JS reads `status`, so errors must carry it too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterReply {
    #[serde(default)]
    pub ok: bool,
    #[serde(default)]
    pub modified: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// An API error body: `{"error": "...", "status": n}` plus optional code and data (publicerr shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorBody {
    /// An error body with a status and a message.
    pub fn new(status: u16, error: impl Into<String>) -> Self {
        ErrorBody {
            error: error.into(),
            status,
            code: None,
            data: None,
        }
    }
}

/// The body an SDK answers an in-band sync `PUT` with (§4.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InBandSyncResponse {
    pub app_id: String,
    #[serde(
        rename = "appVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub app_version: Option<String>,
    #[serde(default)]
    pub capabilities: Value,
    #[serde(default)]
    pub env: Option<String>,
    #[serde(default)]
    pub framework: String,
    pub functions: Vec<FunctionConfig>,
    #[serde(default)]
    pub inspection: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default)]
    pub sdk_author: String,
    #[serde(default)]
    pub sdk_language: String,
    #[serde(default)]
    pub sdk_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdk: Option<String>,
    pub url: String,
}

impl InBandSyncResponse {
    /// The register request this in-band answer stands for (`appName = app_id`).
    pub fn into_register_request(self) -> RegisterRequest {
        let sdk = self
            .sdk
            .unwrap_or_else(|| format!("{}:v{}", self.sdk_language, self.sdk_version));
        RegisterRequest {
            url: self.url,
            deploy_type: "ping".to_string(),
            framework: self.framework,
            app_name: self.app_id,
            functions: self.functions,
            sdk,
            v: "0.1".to_string(),
            deploy_id: None,
            capabilities: Some(self.capabilities),
            app_version: self.app_version,
        }
    }
}

/// Introspection schema version (§5).
pub const INTROSPECTION_SCHEMA_VERSION: &str = "2024-05-24";

/// The body of `GET <app url>`. Authenticated fields are `None` for unsigned requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Introspection {
    pub extra: Value,
    pub has_event_key: bool,
    pub has_signing_key: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_signing_key_fallback: Option<bool>,
    pub function_count: usize,
    /// `dev` or `cloud`.
    pub mode: String,
    pub schema_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication_succeeded: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_api_origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_key_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framework: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdk_language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdk_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_fallback_hash: Option<String>,
}
