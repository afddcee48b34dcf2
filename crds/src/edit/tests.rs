use serde::Deserialize;

use super::*;

const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn v2() -> ReleaseEdit<'static> {
    ReleaseEdit {
        id: "v2",
        artifact: "s3://releases/web/app-v2.tar.gz",
        sha256: SHA,
    }
}

/// What the edited text means, read back with the YAML parser.
fn release_of(text: &str, cluster: &str) -> (String, String, String) {
    #[derive(Deserialize)]
    struct Doc {
        metadata: Meta,
        spec: Spec,
    }
    #[derive(Deserialize)]
    struct Meta {
        name: String,
    }
    #[derive(Deserialize)]
    struct Spec {
        release: Release,
    }
    #[derive(Deserialize)]
    struct Release {
        id: String,
        artifact: String,
        sha256: String,
    }
    let docs: Vec<Doc> = serde_saphyr::from_multiple(text).expect("edited text parses");
    let d = docs
        .into_iter()
        .find(|d| d.metadata.name == cluster)
        .expect("cluster still there");
    (
        d.spec.release.id,
        d.spec.release.artifact,
        d.spec.release.sha256,
    )
}

fn assert_means_v2(out: &str, cluster: &str) {
    assert_eq!(
        release_of(out, cluster),
        (
            "v2".to_string(),
            "s3://releases/web/app-v2.tar.gz".to_string(),
            SHA.to_string()
        ),
        "{out}"
    );
}

const WEB: &str = "\
# yaml-language-server: $schema=../crds/schema/cluster.json
apiVersion: hangar/v1alpha1
kind: Cluster
metadata:
  name: web   # the shop
spec:
  region: eu-west-1
  capacity: { min: 2, max: 20 }

  # What runs on the nodes.
  release:
    id: 3f2a9c1          # build 41
    artifact: s3://releases/web/app-3f2a9c1.tar.gz
    sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    appRoot: /srv/app
    hooks:
      afterActivate:
        - sudo systemctl reload php8.2-fpm
  drain:
    timeout: 60s
";

#[test]
fn only_the_three_values_change_comments_and_spacing_stay() {
    let out = set_release(WEB, "web", &v2()).unwrap();
    let expected = WEB
        .replace(
            "id: 3f2a9c1          # build 41",
            "id: v2          # build 41",
        )
        .replace(
            "artifact: s3://releases/web/app-3f2a9c1.tar.gz",
            "artifact: s3://releases/web/app-v2.tar.gz",
        )
        .replace(
            "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            &format!("sha256: {SHA}"),
        );
    assert_eq!(out, expected);
    assert_means_v2(&out, "web");
}

#[test]
fn an_edit_that_changes_nothing_gives_the_same_bytes() {
    let same = ReleaseEdit {
        id: "3f2a9c1",
        artifact: "s3://releases/web/app-3f2a9c1.tar.gz",
        sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    };
    assert_eq!(set_release(WEB, "web", &same).unwrap(), WEB);
}

#[test]
fn quoting_styles_are_kept() {
    let text = WEB.replace("id: 3f2a9c1 ", "id: \"3f2a9c1\"").replace(
        "artifact: s3://releases/web/app-3f2a9c1.tar.gz",
        "artifact: 's3://releases/web/app-3f2a9c1.tar.gz'",
    );
    let out = set_release(&text, "web", &v2()).unwrap();
    assert!(out.contains("    id: \"v2\"         # build 41\n"), "{out}");
    assert!(
        out.contains("    artifact: 's3://releases/web/app-v2.tar.gz'\n"),
        "{out}"
    );
    assert_means_v2(&out, "web");
}

#[test]
fn quotes_inside_values_are_escaped_in_their_style() {
    let text = WEB.replace("id: 3f2a9c1 ", "id: \"3f\\\"2a\"").replace(
        "artifact: s3://releases/web/app-3f2a9c1.tar.gz",
        "artifact: 'it''s'",
    );
    let edit = ReleaseEdit {
        id: "a\"b\\c",
        artifact: "https://example.com/it's.tar.gz",
        sha256: SHA,
    };
    let out = set_release(&text, "web", &edit).unwrap();
    assert!(out.contains(r#"id: "a\"b\\c""#), "{out}");
    assert!(
        out.contains("artifact: 'https://example.com/it''s.tar.gz'"),
        "{out}"
    );
    let (id, artifact, _) = release_of(&out, "web");
    assert_eq!(id, "a\"b\\c");
    assert_eq!(artifact, "https://example.com/it's.tar.gz");
}

#[test]
fn a_plain_value_that_would_read_as_a_number_or_bool_is_quoted() {
    for id in [
        "123", "1e5", "true", "null", "0x1f", "no", "a: b", "#1", "-x", "",
    ] {
        let edit = ReleaseEdit { id, ..v2() };
        let out = set_release(WEB, "web", &edit).unwrap();
        assert_eq!(release_of(&out, "web").0, id, "{out}");
        assert!(out.contains(&format!("id: \"{id}\"")), "{id}: {out}");
    }
    // A build number that is also a git describe stays plain.
    let out = set_release(
        WEB,
        "web",
        &ReleaseEdit {
            id: "v1.2.3-4-gabc",
            ..v2()
        },
    )
    .unwrap();
    assert!(out.contains("    id: v1.2.3-4-gabc "), "{out}");
}

#[test]
fn crlf_files_keep_crlf_also_on_inserted_lines() {
    let text = WEB
        .replace(
            "    sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n",
            "",
        )
        .replace('\n', "\r\n");
    let out = set_release(&text, "web", &v2()).unwrap();
    assert!(
        !out.replace("\r\n", "").contains('\n'),
        "a bare LF: {out:?}"
    );
    assert!(
        out.contains(&format!(
            "    artifact: s3://releases/web/app-v2.tar.gz\r\n    sha256: {SHA}\r\n    appRoot"
        )),
        "{out:?}"
    );
    assert_means_v2(&out, "web");
}

#[test]
fn four_space_and_uneven_indentation() {
    let text = "\
metadata:
    name: web
spec:
    region: eu-west-1
    release:
          id: v1
          artifact: file:///srv/builds/v1.tar.gz
          sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    drain: {}
";
    let out = set_release(text, "web", &v2()).unwrap();
    assert!(out.contains("\n          id: v2\n"), "{out}");
    assert_means_v2(&out, "web");
    assert!(out.ends_with("    drain: {}\n"));
}

#[test]
fn absent_fields_are_added_in_order_at_the_fields_indentation() {
    // sha256 missing: goes after artifact.
    let text = WEB.replace(
        "    sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n",
        "",
    );
    let out = set_release(&text, "web", &v2()).unwrap();
    assert!(
        out.contains(&format!(
            "    artifact: s3://releases/web/app-v2.tar.gz\n    sha256: {SHA}\n    appRoot: /srv/app\n"
        )),
        "{out}"
    );
    assert_means_v2(&out, "web");

    // All three missing: right after `release:`, in field order.
    let text = "\
metadata: { name: web }
spec:
  release:   # filled in by CI
    appRoot: /srv/app
";
    let out = set_release(text, "web", &v2()).unwrap();
    assert_eq!(
        out,
        format!(
            "\
metadata: {{ name: web }}
spec:
  release:   # filled in by CI
    id: v2
    artifact: s3://releases/web/app-v2.tar.gz
    sha256: {SHA}
    appRoot: /srv/app
"
        )
    );
}

#[test]
fn an_empty_release_block_at_the_end_of_a_file_without_newline() {
    let text = "metadata:\n   name: web\nspec:\n   region: x\n   release:";
    let out = set_release(text, "web", &v2()).unwrap();
    assert_eq!(
        out,
        format!(
            "metadata:\n   name: web\nspec:\n   region: x\n   release:\n      id: v2\n      artifact: s3://releases/web/app-v2.tar.gz\n      sha256: {SHA}"
        )
    );
    assert_means_v2(&out, "web");
}

#[test]
fn a_key_without_value_gets_one() {
    let text =
        "metadata:\n  name: web\nspec:\n  release:\n    id:\n    artifact: # todo\n    sha256: x\n";
    let out = set_release(text, "web", &v2()).unwrap();
    assert!(out.contains("    id: v2\n"), "{out}");
    assert!(
        out.contains("    artifact: s3://releases/web/app-v2.tar.gz # todo\n"),
        "{out}"
    );
    assert_means_v2(&out, "web");
}

#[test]
fn only_the_named_cluster_of_a_multi_document_file_changes() {
    let api = WEB.replace("name: web   # the shop", "name: api");
    let text = format!("{WEB}---\n{api}");
    let out = set_release(&text, "api", &v2()).unwrap();
    assert!(out.starts_with(WEB), "the first document changed: {out}");
    assert_means_v2(&out, "api");
    assert_eq!(release_of(&out, "web").0, "3f2a9c1");
}

#[test]
fn a_cluster_not_in_the_file_names_the_ones_that_are() {
    let err = set_release(WEB, "api", &v2()).unwrap_err();
    assert_eq!(
        err,
        EditError::ClusterNotFound {
            name: "api".into(),
            found: "`web`".into()
        }
    );
    assert!(err.to_string().contains("no cluster named `api`"));
}

#[test]
fn a_cluster_defined_twice_is_ambiguous() {
    let text = format!("{WEB}---\n{WEB}");
    let err = set_release(&text, "web", &v2()).unwrap_err();
    assert!(
        matches!(&err, EditError::DuplicateCluster { lines, .. } if lines == "1, 21"),
        "{err}"
    );
}

#[test]
fn a_key_given_twice_is_refused_with_both_lines() {
    let text = WEB.replace(
        "    appRoot: /srv/app\n",
        "    appRoot: /srv/app\n    id: again\n",
    );
    let err = set_release(&text, "web", &v2()).unwrap_err();
    assert_eq!(
        err,
        EditError::DuplicateKey {
            line: 16,
            first: 12,
            path: "spec.release.id".into()
        }
    );
}

#[test]
fn a_missing_release_block_is_reported() {
    let text = "metadata:\n  name: web\nspec:\n  region: x\n";
    let err = set_release(text, "web", &v2()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 3: spec.release: missing; add a `release:` block by hand first"
    );
    let err = set_release("metadata:\n  name: web\n", "web", &v2()).unwrap_err();
    assert!(
        matches!(err, EditError::Missing { key: "spec", .. }),
        "{err}"
    );
}

#[test]
fn forms_that_cannot_be_edited_safely_are_refused_with_their_line() {
    let cases = [
        (
            "metadata: {name: web}\nspec:\n  release: {id: v1, artifact: a, sha256: b}\n",
            3,
            "spec.release",
            "flow style",
        ),
        (
            "metadata: {name: web}\nspec: {release: {id: v1}}\n",
            2,
            "spec",
            "flow style",
        ),
        (
            "metadata: {name: web}\nspec:\n  release: &rel\n    id: v1\n",
            3,
            "spec.release",
            "anchor",
        ),
        (
            "x: &rel {id: v1}\nmetadata: {name: web}\nspec:\n  release: *rel\n",
            4,
            "spec.release",
            "anchor or alias",
        ),
        (
            "metadata: {name: web}\nspec:\n  release:\n    id: |\n      v1\n",
            4,
            "spec.release.id",
            "block scalar",
        ),
        (
            "metadata: {name: web}\nspec:\n  release:\n    id: v1\n      continued\n",
            5,
            "spec.release.id",
            "continues on the next line",
        ),
        (
            "metadata: {name: web}\nspec:\n  release:\n    artifact: \"s3://a/\n      b\"\n",
            4,
            "spec.release.artifact",
            "continues on the next line",
        ),
        (
            "metadata: {name: web}\nspec:\n  release:\n    id: !!str v1\n",
            4,
            "spec.release.id",
            "tagged",
        ),
        (
            "metadata: {name: web}\nspec:\n  release:\n    - id: v1\n",
            4,
            "spec.release",
            "sequence",
        ),
    ];
    for (text, line, path, why) in cases {
        match set_release(text, "web", &v2()) {
            Err(EditError::Unsupported {
                line: l,
                path: p,
                reason,
            }) => {
                assert_eq!((l, p.as_str()), (line, path), "{text}");
                assert!(reason.contains(why), "{text}: {reason}");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn keys_nested_deeper_or_in_other_blocks_are_not_mistaken_for_the_fields() {
    // `id:` under hooks and a `release:` under another key are not ours.
    let text = "\
metadata:
  name: web
  release:
    id: not-this
spec:
  other:
    release:
      id: nor-this
  release:
    hooks:
      id: deeper
    id: v1
    artifact: a
    sha256: b
";
    let out = set_release(text, "web", &v2()).unwrap();
    assert!(out.contains("    id: not-this\n"));
    assert!(out.contains("      id: nor-this\n"));
    assert!(out.contains("      id: deeper\n"));
    assert_means_v2(&out, "web");
}

#[test]
fn invalid_yaml_is_an_error_not_an_edit() {
    let err = set_release("metadata: [unclosed\n", "web", &v2()).unwrap_err();
    assert!(matches!(err, EditError::InvalidYaml(_)), "{err}");
}
