//! The HTTP API: routes, request parsing and JSON answers. Every bad
//! request gets a 4xx with `{"error": "..."}` naming what is wrong, and
//! nothing a client sends can stop the agent serving the next one.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use super::{Agent, AgentError, StopError, Submitted};
use crate::task::{TaskFile, parse_json, parse_toml};
use crate::vm::TaskDir;

/// Largest request body: a task file is a few hundred bytes.
pub const MAX_BODY: usize = 1 << 20;

pub type Body = BoxBody<Bytes, Infallible>;

/// The endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    Metrics,
    ListTasks,
    Submit,
    Status(String),
    Stop(String),
    Logs(String),
}

/// Why a request matched no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    NotFound,
    /// The path exists, with these methods.
    Method(&'static str),
}

/// Matches a method and path to an endpoint. Pure.
pub fn route(method: &Method, path: &str) -> Result<Route, NoRoute> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let (allow, route) = match parts.as_slice() {
        ["v1", "health"] => ("GET", (*method == Method::GET).then_some(Route::Health)),
        ["metrics"] => ("GET", (*method == Method::GET).then_some(Route::Metrics)),
        ["v1", "tasks"] => (
            "GET, POST",
            match *method {
                Method::GET => Some(Route::ListTasks),
                Method::POST => Some(Route::Submit),
                _ => None,
            },
        ),
        ["v1", "tasks", id] if !id.is_empty() => (
            "GET",
            (*method == Method::GET).then(|| Route::Status(id.to_string())),
        ),
        ["v1", "tasks", id, "stop"] => (
            "POST",
            (*method == Method::POST).then(|| Route::Stop(id.to_string())),
        ),
        ["v1", "tasks", id, "logs"] => (
            "GET",
            (*method == Method::GET).then(|| Route::Logs(id.to_string())),
        ),
        _ => return Err(NoRoute::NotFound),
    };
    route.ok_or(NoRoute::Method(allow))
}

/// A task file in the body, by Content-Type (JSON or TOML; without one,
/// JSON if it looks like JSON). Pure.
pub fn parse_task_body(content_type: Option<&str>, body: &[u8]) -> Result<TaskFile, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "The task is not UTF-8 text"))?;
    let kind = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let json = match kind.as_str() {
        "application/json" => true,
        "application/toml" | "text/toml" | "application/x-toml" | "text/x-toml" => false,
        "" => text.trim_start().starts_with('{'),
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Unsupported Content-Type {other:?}: send application/json or application/toml"
                ),
            ));
        }
    };
    if json {
        parse_json(text).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("Malformed JSON task: {e}"))
        })
    } else {
        parse_toml(text).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("Malformed TOML task: {}", e.to_string().trim()),
            )
        })
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub fields: Option<serde_json::Value>,
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            fields: None,
            allow: None,
        }
    }

    fn response(self) -> Response<Body> {
        let mut body = serde_json::json!({ "error": self.message });
        if let Some(fields) = self.fields {
            body["fields"] = fields;
        }
        let mut resp = json(self.status, &body);
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
        }
        resp
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    BoxBody::new(Full::new(bytes.into()))
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let mut text = serde_json::to_vec_pretty(value).expect("answers serialize");
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(text))
        .expect("a valid response")
}

/// Serves one request.
pub async fn handle(
    agent: Arc<Agent>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let answer = match route(&method, &path) {
        Ok(r) => dispatch(&agent, r, req).await,
        Err(NoRoute::NotFound) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("No such endpoint: {method} {path}"),
        )),
        Err(NoRoute::Method(allow)) => Err(ApiError {
            allow: Some(allow),
            ..ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path} (allowed: {allow})"),
            )
        }),
    };
    let resp = answer.unwrap_or_else(|e| {
        tracing::debug!(%method, %path, status = e.status.as_u16(), error = %e.message, "bad request");
        e.response()
    });
    Ok(resp)
}

fn query_flag(req: &Request<Incoming>, name: &str) -> bool {
    req.uri().query().is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .any(|(k, v)| k == name && matches!(v.as_ref(), "" | "1" | "true" | "yes"))
    })
}

async fn read_body(req: Request<Incoming>) -> Result<(Option<String>, Bytes), ApiError> {
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The request body exceeds {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_big());
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_big()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("Cannot read the body: {e}"),
                )
            }
        })?
        .to_bytes();
    Ok((content_type, body))
}

fn unknown(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("No task {id}"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    timeout_s: Option<u64>,
}

async fn dispatch(
    agent: &Arc<Agent>,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    match route {
        Route::Health => Ok(json(StatusCode::OK, &agent.health())),
        Route::Metrics => Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(full(agent.metrics_text()))
            .expect("a valid response")),
        Route::ListTasks => Ok(json(StatusCode::OK, &agent.list())),
        Route::Status(id) => agent
            .status(&id)
            .map(|s| json(StatusCode::OK, &s))
            .ok_or_else(|| unknown(&id)),
        Route::Submit => {
            let key = req
                .headers()
                .get("idempotency-key")
                .map(|v| {
                    v.to_str().map(str::to_string).map_err(|_| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "Invalid Idempotency-Key: it holds a byte that is not visible ASCII",
                        )
                    })
                })
                .transpose()?;
            let (content_type, body) = read_body(req).await?;
            let file = parse_task_body(content_type.as_deref(), &body)?;
            let task = file.into_task().map_err(|errors| ApiError {
                fields: serde_json::to_value(
                    errors
                        .0
                        .iter()
                        .map(|e| serde_json::json!({"field": e.field, "problem": e.problem}))
                        .collect::<Vec<_>>(),
                )
                .ok(),
                ..ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("Invalid task: {errors}"),
                )
            })?;
            let (status, record) = match agent.submit(task, key) {
                Ok(Submitted::Created(record)) => (StatusCode::CREATED, record),
                Ok(Submitted::Replayed(record)) => (StatusCode::OK, record),
                Err(e) => return Err(submit_error(e)),
            };
            Ok(json(
                status,
                &serde_json::json!({"id": record.id, "name": record.name, "state": record.state}),
            ))
        }
        Route::Stop(id) => {
            let wait = query_flag(&req, "wait");
            let (_, body) = read_body(req).await?;
            let stop: StopBody = if body.iter().all(u8::is_ascii_whitespace) {
                StopBody::default()
            } else {
                serde_json::from_slice(&body).map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("Malformed stop request (expected {{\"timeout_s\": N}}): {e}"),
                    )
                })?
            };
            let handle = agent
                .stop(&id, stop.timeout_s.map(Duration::from_secs))
                .map_err(|e| match e {
                    StopError::NotFound(_) => unknown(&id),
                    e @ StopError::Ended { .. } => {
                        ApiError::new(StatusCode::CONFLICT, e.to_string())
                    }
                })?;
            if !wait {
                return Ok(json(
                    StatusCode::ACCEPTED,
                    &serde_json::json!({"id": id, "state": handle.state()}),
                ));
            }
            let mut states = handle.watch();
            let _ = states.wait_for(|s| s.is_terminal()).await;
            agent
                .status(&id)
                .map(|s| json(StatusCode::OK, &s))
                .ok_or_else(|| unknown(&id))
        }
        Route::Logs(id) => {
            let handle = agent.task(&id).ok_or_else(|| unknown(&id))?;
            let dir = TaskDir {
                root: handle.record().dir,
            };
            let serial = query_flag(&req, "serial");
            let follow = query_flag(&req, "follow");
            let path = if serial {
                dir.serial_log()
            } else {
                dir.qemu_log()
            };
            if !follow && !path.exists() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "Task {id} has no {} yet",
                        if serial { "serial log" } else { "qemu log" }
                    ),
                ));
            }
            Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(super::logs::body(path, follow, handle))
                .expect("a valid response"))
        }
    }
}

/// The answer to a submit the agent refused.
fn submit_error(e: AgentError) -> ApiError {
    let status = match e {
        AgentError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        AgentError::PortTaken { .. } | AgentError::KeyReused { .. } => StatusCode::CONFLICT,
        AgentError::InvalidKey(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, crate::error_chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_wrong_methods() {
        assert_eq!(route(&Method::GET, "/v1/health"), Ok(Route::Health));
        assert_eq!(route(&Method::GET, "/v1/tasks/"), Ok(Route::ListTasks));
        assert_eq!(route(&Method::POST, "/v1/tasks"), Ok(Route::Submit));
        assert_eq!(
            route(&Method::GET, "/v1/tasks/web-1"),
            Ok(Route::Status("web-1".into()))
        );
        assert_eq!(
            route(&Method::POST, "/v1/tasks/web-1/stop"),
            Ok(Route::Stop("web-1".into()))
        );
        assert_eq!(
            route(&Method::GET, "/v1/tasks/web-1/logs"),
            Ok(Route::Logs("web-1".into()))
        );
        assert_eq!(route(&Method::GET, "/metrics"), Ok(Route::Metrics));
        assert_eq!(
            route(&Method::DELETE, "/v1/tasks"),
            Err(NoRoute::Method("GET, POST"))
        );
        assert_eq!(
            route(&Method::GET, "/v1/tasks/web-1/stop"),
            Err(NoRoute::Method("POST"))
        );
        assert_eq!(route(&Method::GET, "/v2/tasks"), Err(NoRoute::NotFound));
        assert_eq!(route(&Method::GET, "/"), Err(NoRoute::NotFound));
    }

    const TOML: &str = "name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"0123456789abcdef0123456789abcdef\"\nhost_port = 18080\nguest_port = 8080\n";

    #[test]
    fn task_bodies_by_content_type() {
        let file = parse_task_body(Some("application/toml"), TOML.as_bytes()).unwrap();
        let task = file.into_task().unwrap();
        assert_eq!(task.name, "web");
        // A serialized task is itself a valid JSON task file.
        let json = serde_json::to_vec(&task).unwrap();
        let back = parse_task_body(Some("application/json; charset=utf-8"), &json)
            .unwrap()
            .into_task()
            .unwrap();
        assert_eq!(back, task);
        assert!(parse_task_body(None, &json).is_ok());
        assert!(parse_task_body(None, TOML.as_bytes()).is_ok());

        let err = parse_task_body(Some("application/json"), b"{\"name\": ").unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(
            err.message.starts_with("Malformed JSON task: "),
            "{}",
            err.message
        );
        let err = parse_task_body(Some("application/toml"), b"name = ").unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(
            err.message.starts_with("Malformed TOML task: "),
            "{}",
            err.message
        );
        let err = parse_task_body(Some("application/yaml"), b"name: x").unwrap_err();
        assert_eq!(err.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let err = parse_task_body(None, &[0xff, 0xfe]).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }
}
