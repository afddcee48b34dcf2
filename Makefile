# The two commands of the quickstart, plus the checks CI runs.
.PHONY: demo test lint

# Runs hangar's main job on the local cloud: spec → nodes launched,
# provisioned, released, registered, scaled out under load and back in.
demo:
	./infra/local/demo

# Installs the prerequisites and builds the Debian node images (once; a
# no-op when cached, so no test's deadline pays for a build), then runs
# every test.
test:
	./infra/local/setup --images
	cargo test --workspace

# Formatting, clippy, and cargo deny (advisories, bans, licenses, sources;
# offline against ../shared/advisory-db.tar.gz when it is there).
lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	./infra/ci/deny
