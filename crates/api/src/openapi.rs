//! `GET /api/v1/openapi.json`: the OpenAPI 3.1 document of every public route.

use crate::views::ErrorBody;
use crate::SharedState;
use crate::{
    accounts, agent, api_keys, audit, catalog, deployments, downloads, events, instances,
    observability, spend, system,
};
use axum::extract::State;
use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gpufleet",
        description = "Control plane for GPU fleets serving LLMs. Every `/api/` route but sign-in needs a caller: `Authorization: Bearer <admin token>` (everything), `Authorization: Bearer gfp_…` (a user's personal access token) or the console's session cookie (writes also send `x-csrf-token`). A user's role in a project (admin, operator, viewer) decides what they may do there; another project's resources answer 404."
    ),
    paths(
        instances::create,
        instances::list,
        instances::get,
        instances::terminate,
        instances::archive,
        instances::timeline,
        instances::metrics,
        deployments::create,
        deployments::list,
        deployments::get,
        deployments::patch,
        deployments::delete,
        deployments::timeline,
        catalog::providers,
        catalog::instance_types,
        catalog::models,
        events::stream,
        system::tasks,
        system::healthz,
        system::readyz,
        api_keys::create,
        api_keys::list,
        api_keys::revoke,
        api_keys::patch,
        api_keys::usage,
        spend::report,
        document,
        agent::register,
        agent::heartbeat,
        agent::events,
        agent::engine_env,
        agent::engine_cert,
        observability::fleet,
        observability::targets,
        observability::prometheus,
        downloads::agent_binary,
        accounts::login,
        accounts::logout,
        accounts::me,
        accounts::providers,
        accounts::create_token,
        accounts::list_tokens,
        accounts::revoke_token,
        accounts::create_user,
        accounts::list_users,
        accounts::create_project,
        accounts::list_projects,
        accounts::get_project,
        accounts::list_members,
        accounts::grant,
        accounts::revoke,
        audit::list,
    ),
    components(schemas(
        gpufleet_domain::ProjectId,
        gpufleet_domain::UserId,
        gpufleet_domain::AccessTokenId
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "instances", description = "GPU instances serving a model"),
        (name = "deployments", description = "A model's serving declared once: replicas kept, replaced, autoscaled"),
        (name = "catalog", description = "Providers, instance types and models"),
        (name = "events", description = "Live instance changes (SSE)"),
        (name = "system", description = "Health and background tasks"),
        (name = "metrics", description = "Fleet figures and Prometheus service discovery"),
        (name = "api-keys", description = "Keys of the OpenAI-compatible endpoint (/v1/...) and their usage"),
        (name = "spend", description = "What the machines cost, per project, deployment, model or provider, and per million tokens"),
        (name = "agent", description = "Called by the worker agents, not by users"),
        (name = "auth", description = "Signing in: sessions, personal access tokens"),
        (name = "accounts", description = "Users, projects and their members' roles"),
        (name = "audit", description = "Who changed what, when, and how it ended"),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token, or a personal access token (`gfp_…`)",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "agent_token",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An agent token from `register`; valid for its own instance only",
                    ))
                    .build(),
            ),
        );
    }
}

/// This document.
#[utoipa::path(
    get, path = "/api/v1/openapi.json", tag = "system",
    responses(
        (status = 200, description = "OpenAPI document", content_type = "application/json", body = Object),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn document(State(state): State<SharedState>) -> Json<OpenApiDoc> {
    Json(ApiDoc::for_server(
        state.fleet.config().max_instances_per_request,
    ))
}

impl ApiDoc {
    /// The document with the limits of this server's configuration filled
    /// in (`count` of a create is at most `max_instances_per_request`).
    pub fn for_server(max_instances_per_request: u32) -> OpenApiDoc {
        use utoipa::openapi::schema::Schema;
        use utoipa::openapi::RefOr;
        let mut doc = ApiDoc::openapi();
        let count = doc
            .components
            .as_mut()
            .and_then(|c| c.schemas.get_mut("CreateInstancesBody"))
            .and_then(|s| match s {
                RefOr::T(Schema::Object(o)) => o.properties.get_mut("count"),
                _ => None,
            });
        if let Some(RefOr::T(Schema::Object(count))) = count {
            count.maximum = Some(f64::from(max_instances_per_request).into());
        }
        doc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_lists_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/api/v1/instances",
            "/api/v1/instances/{id}",
            "/api/v1/instances/{id}/archive",
            "/api/v1/instances/{id}/events",
            "/api/v1/instances/{id}/metrics",
            "/api/v1/deployments",
            "/api/v1/deployments/{id}",
            "/api/v1/deployments/{id}/events",
            "/api/v1/providers",
            "/api/v1/providers/{name}/instance-types",
            "/api/v1/models",
            "/api/v1/events",
            "/api/v1/system/tasks",
            "/api/v1/openapi.json",
            "/api/v1/api-keys",
            "/api/v1/api-keys/{id}",
            "/api/v1/usage",
            "/api/v1/spend",
            "/healthz",
            "/readyz",
            "/metrics",
            "/api/v1/metrics/fleet",
            "/api/v1/prometheus/targets",
            gpufleet_proto::paths::REGISTER,
            gpufleet_proto::paths::HEARTBEAT,
            gpufleet_proto::paths::EVENTS,
        ] {
            assert!(paths.contains_key(p), "missing {p}");
        }
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for s in [
            "InstanceView",
            "CreateInstancesBody",
            "ErrorBody",
            "Heartbeat",
            "TaskStatus",
            "DeploymentView",
            "CreateDeploymentBody",
            "SpendView",
        ] {
            assert!(schemas.contains_key(s), "missing schema {s}");
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }
}

#[cfg(test)]
mod spend_doc {
    use utoipa::OpenApi;

    #[test]
    fn spend_parameters_are_exact_enums_and_patterns() {
        let doc = serde_json::to_value(super::ApiDoc::openapi()).unwrap();
        let params = doc["paths"]["/api/v1/spend"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .clone();
        let schema = |name: &str| {
            params
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("no {name}"))["schema"]
                .clone()
        };
        assert_eq!(
            schema("group_by")["enum"],
            serde_json::json!(["project", "deployment", "model", "provider"])
        );
        assert_eq!(schema("step")["enum"], serde_json::json!(["1h", "1d"]));
        assert_eq!(schema("from")["format"], "date-time");
        assert_eq!(schema("to")["format"], "date-time");
        assert_eq!(schema("project")["$ref"], "#/components/schemas/ProjectId");
        assert_eq!(
            doc["components"]["schemas"]["ProjectId"]["pattern"],
            gpufleet_domain::ProjectId::PATTERN
        );
    }
}
