//! `Secrets` on the SDK against the local cloud (moto behind the gateway):
//! paths page and recurse, SecureStrings come back decrypted, JSON secrets
//! become variables, and a missing or denied source is a typed error that
//! names it and none of the values.

use aws_sdk_ssm::types::ParameterType;
use hangar_cloud::secrets::{read_all, Secrets};
use hangar_cloud::{AwsCloud, CloudError, SecretsError};
use hangar_crds::SecretSource;
use hangar_local::{LocalCloud, LocalCloudOptions};

fn ssm(path: &str) -> SecretSource {
    SecretSource {
        ssm: Some(path.into()),
        secrets_manager: None,
        env: None,
    }
}

fn sm(id: &str, env: Option<&str>) -> SecretSource {
    SecretSource {
        ssm: None,
        secrets_manager: Some(id.into()),
        env: env.map(str::to_string),
    }
}

#[test]
fn secrets_are_read_paged_decrypted_and_failures_are_typed() {
    hangar_local::init_test_logging();
    let local = LocalCloud::start(LocalCloudOptions::default())
        .expect("local cloud starts (run `sudo infra/local/setup` once)");
    let sdk = local.sdk_config();
    let state = tempfile::tempdir().unwrap();
    local.block_on(async {
        let ssm_client = aws_sdk_ssm::Client::new(&sdk);
        let sm_client = aws_sdk_secretsmanager::Client::new(&sdk);
        // 12 parameters: more than one page (GetParametersByPath pages at 10).
        for i in 0..11 {
            ssm_client
                .put_parameter()
                .name(format!("/prod/web/group{}/VAR_{i:02}", i % 3))
                .value(format!("value-{i}"))
                .r#type(ParameterType::String)
                .send()
                .await
                .unwrap();
        }
        ssm_client
            .put_parameter()
            .name("/prod/web/DB_PASSWORD")
            .value("pa$$ word \"q\"")
            .r#type(ParameterType::SecureString)
            .send()
            .await
            .unwrap();
        ssm_client
            .put_parameter()
            .name("/prod/shared/SENTRY_DSN")
            .value("https://k@sentry.example/1")
            .r#type(ParameterType::SecureString)
            .send()
            .await
            .unwrap();
        sm_client
            .create_secret()
            .name("prod/web/api-keys")
            .secret_string(r#"{"STRIPE_KEY":"sk_live_1","PORT":8080}"#)
            .send()
            .await
            .unwrap();
        sm_client
            .create_secret()
            .name("prod/web/token")
            .secret_string("plain-token-value")
            .send()
            .await
            .unwrap();

        let cloud = AwsCloud::new(&sdk, "hangar-test", state.path()).unwrap();
        let params = cloud.parameters_by_path("/prod/web/").await.unwrap();
        assert_eq!(params.len(), 12, "every page, recursively");
        let db = params
            .iter()
            .find(|p| p.name == "/prod/web/DB_PASSWORD")
            .unwrap();
        assert_eq!(db.value.expose(), "pa$$ word \"q\"", "decrypted");

        let sources = [
            ssm("/prod/web/"),
            ssm("/prod/shared/SENTRY_DSN"),
            sm("prod/web/api-keys", None),
            sm("prod/web/token", Some("API_TOKEN")),
        ];
        let vars = read_all(&cloud, &sources).await.unwrap();
        assert_eq!(vars.len(), 12 + 1 + 2 + 1, "{:?}", vars.keys());
        assert_eq!(vars["VAR_07"].expose(), "value-7");
        assert_eq!(vars["SENTRY_DSN"].expose(), "https://k@sentry.example/1");
        assert_eq!(vars["STRIPE_KEY"].expose(), "sk_live_1");
        assert_eq!(vars["PORT"].expose(), "8080");
        assert_eq!(vars["API_TOKEN"].expose(), "plain-token-value");

        // Missing: a parameter, a path with nothing under it, a secret.
        for (source, what) in [
            (ssm("/prod/web/NOPE"), "ssm:/prod/web/NOPE"),
            (ssm("/prod/empty/"), "ssm:/prod/empty/"),
            (sm("prod/nope", Some("X")), "secretsManager:prod/nope"),
        ] {
            let e = read_all(&cloud, &[source]).await.unwrap_err();
            assert_eq!(e.kind(), "not_found", "{e}");
            assert!(e.to_string().starts_with(what), "{e}");
            assert!(!e.is_transient());
        }

        // Denied, as a role whose policy does not name them would be.
        local.gateway().deny_secret("ssm", "/prod/web/");
        local.gateway().deny_secret("secretsmanager", "prod/web/api-keys");
        let e = cloud.parameters_by_path("/prod/web/").await.unwrap_err();
        assert!(matches!(e, CloudError::AccessDenied { .. }), "{e:?}");
        let e = read_all(&cloud, &sources[2..3]).await.unwrap_err();
        assert!(
            matches!(&e, SecretsError::Read { error: CloudError::AccessDenied { code, .. }, .. } if code == "AccessDeniedException"),
            "{e:?}"
        );
        let shown = e.to_string();
        assert!(shown.contains("secretsManager:prod/web/api-keys"), "{shown}");
        for value in ["sk_live_1", "value-", "pa$$"] {
            assert!(!shown.contains(value), "{shown}");
        }
        // The single parameter outside the denied path is still readable.
        assert!(read_all(&cloud, &sources[1..2]).await.is_ok());
        local.gateway().allow_secret("ssm", "/prod/web/");
        assert_eq!(cloud.parameters_by_path("/prod/web/").await.unwrap().len(), 12);
    });
}
