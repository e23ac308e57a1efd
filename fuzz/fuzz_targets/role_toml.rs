//! Role loading: a role.toml (and the per-environment overlay) as the bundle ships them,
//! through `resolve` (parse, validate every step, includes) and `merged_vars`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // `role.toml` and `env/production.toml`, split at the first NUL-free marker line.
    let (role, overlay) = text.split_once("\n#ENV\n").unwrap_or((text, ""));
    let Ok(dir) = tempfile::tempdir() else { return };
    let r = dir.path().join("roles/x");
    if std::fs::create_dir_all(r.join("env")).is_err() || std::fs::create_dir_all(r.join("files")).is_err() {
        return;
    }
    let _ = std::fs::write(r.join("role.toml"), role);
    let _ = std::fs::write(r.join("env/production.toml"), overlay);
    let _ = std::fs::write(r.join("files/t.j2"), "{{ x }}");
    let env = bootstrap::template::environment();
    if let Ok(roles) = bootstrap::role::resolve(dir.path(), "x", &env) {
        let _ = bootstrap::role::merged_vars(&roles, Some("production"));
    }
});
