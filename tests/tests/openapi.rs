//! `GET /openapi.json` against the real API: an OpenAPI 3.1 document with
//! every route served (demo and admin routes on), each answer described
//! by a schema it defines, and the README's API table naming exactly the
//! same routes.

use std::collections::BTreeSet;

use anyhow::Context as _;
use harness::{Api, TestDb};
use serde_json::Value;

/// `METHOD path` of each operation in the document.
fn operations(document: &Value) -> anyhow::Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    for (path, item) in document["paths"].as_object().context("paths")? {
        for method in item.as_object().context("path item")?.keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                found.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    Ok(found)
}

/// `METHOD path` of each row of the README's API table (the query dropped).
fn readme_routes() -> anyhow::Result<BTreeSet<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let table = readme
        .split("## HTTP API")
        .nth(1)
        .context("an HTTP API section")?
        .split("\n## ")
        .next()
        .unwrap_or_default();
    Ok(table
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|line| line.split('`').next())
        .filter(|route| {
            ["GET ", "POST ", "DELETE "]
                .iter()
                .any(|m| route.starts_with(m))
        })
        .map(|route| route.split('?').next().unwrap_or(route).to_owned())
        .collect())
}

#[tokio::test]
async fn the_openapi_document_describes_every_route_and_the_readme_table_lists_the_same()
-> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let api = Api::start(
        &db,
        &[("ADMIN_TOKEN", "ops=openapi-token-0123456789abcdef")],
    )
    .await?;
    let document = api.get_json("/openapi.json").await?;
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "OpenAPI 3.1: {}",
        document["openapi"]
    );
    assert_eq!(document["info"]["title"], "Widget Store");
    let documented = operations(&document)?;
    for route in [
        "POST /checkout/{key}",
        "POST /payment_webhook/{payment_id}/{status}",
        "POST /admin/workflows/{id}/cancel",
        "GET /openapi.json",
    ] {
        assert!(
            documented.contains(route),
            "{route} documented: {documented:?}"
        );
    }
    assert_eq!(
        readme_routes()?,
        documented,
        "the README's API table and the document name the same routes"
    );

    // Each operation answers something described; each JSON answer by a
    // schema the document defines; the admin's take the bearer scheme.
    let schemas = document["components"]["schemas"]
        .as_object()
        .context("schemas")?;
    let text = document.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(
            schemas.contains_key(name),
            "{name} is referenced but not defined"
        );
    }
    for (path, item) in document["paths"].as_object().context("paths")? {
        for (method, operation) in item.as_object().context("item")? {
            let responses = operation["responses"].as_object().context("responses")?;
            assert!(
                responses.keys().any(|status| status.starts_with('2')),
                "{method} {path} has a success answer"
            );
            if path.starts_with("/admin/") && path != "/admin/" {
                assert!(
                    responses.contains_key("401"),
                    "{method} {path} documents 401"
                );
                assert_eq!(
                    operation["security"][0]["admin_token"],
                    Value::Array(vec![]),
                    "{method} {path} takes the admin token"
                );
            }
        }
    }
    assert_eq!(
        document["components"]["securitySchemes"]["admin_token"]["scheme"],
        "bearer"
    );

    // The errors' shape is the one every error has.
    let error = &schemas["ErrorBody"];
    assert!(error["properties"]["error"].is_object(), "{error}");
    let (status, body) = api.call("GET", "/order/0", None).await?;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_str(&body)?;
    assert!(body["error"]["code"].is_string() && body["error"]["message"].is_string());
    Ok(())
}
