//! Embeds `console/dist` in the crate, rebuilding it first when the console's
//! sources changed and npm is available.
//!
//! "Changed" means: the hash of the sources (see `source_hash`, kept in step
//! with `console/scripts/stamp.mjs`) differs from `console/dist/.source-hash`,
//! which `npm run build` writes. File times are not compared because a git
//! checkout does not keep them.
//!
//! `GPUFLEET_CONSOLE_BUILD`: `auto` (default), `never` (embed dist as it is),
//! `always` (rebuild even when dist looks current). `NPM`: the npm command
//! (default `npm` from PATH).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Inputs of the console build, relative to `console/`.
const INPUTS: &[&str] = &[
    "index.html",
    "package.json",
    "package-lock.json",
    "vite.config.ts",
    "tsconfig.json",
    "tsconfig.app.json",
    "tsconfig.node.json",
    "src",
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let console = manifest.join("../../console");
    let dist = console.join("dist");
    for input in INPUTS {
        println!("cargo:rerun-if-changed={}", console.join(input).display());
    }
    println!("cargo:rerun-if-changed={}", dist.display());
    println!("cargo:rerun-if-env-changed=GPUFLEET_CONSOLE_BUILD");
    println!("cargo:rerun-if-env-changed=NPM");

    let mode = env::var("GPUFLEET_CONSOLE_BUILD").unwrap_or_else(|_| "auto".into());
    let sources = source_hash(&console);
    let built = fs::read_to_string(dist.join(".source-hash"))
        .ok()
        .map(|s| s.trim().to_string());
    let stale = sources.is_some() && built != sources;

    if (stale && mode != "never") || mode == "always" {
        rebuild(&console, &dist);
    } else if stale {
        warn("console sources changed but GPUFLEET_CONSOLE_BUILD=never: embedding console/dist as it is");
    }

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("assets.rs");
    let built = fs::read_to_string(dist.join(".source-hash"))
        .ok()
        .map(|s| s.trim().to_string());
    fs::write(&out, generate(&dist, sources.as_deref(), built.as_deref()))
        .expect("write assets.rs");
}

fn warn(msg: &str) {
    println!("cargo:warning={msg}");
}

/// Runs `npm ci` (when node_modules is missing) and `npm run build`. Without
/// npm, or when the build fails, the existing dist is kept if there is one.
fn rebuild(console: &Path, dist: &Path) {
    let has_dist = dist.join("index.html").is_file();
    let npm =
        env::var("NPM").unwrap_or_else(|_| if cfg!(windows) { "npm.cmd" } else { "npm" }.into());
    let npm = npm.as_str();
    let npm_ok = Command::new(npm)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !npm_ok {
        if has_dist {
            warn("console sources are newer than console/dist but npm is not installed: embedding the existing console/dist");
            return;
        }
        panic!("console/dist is missing and npm is not installed: install Node.js 20+ and npm, or restore console/dist");
    }
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new(npm)
            .args(args)
            .current_dir(console)
            .env_remove("NODE_OPTIONS")
            .output()
            .map_err(|e| format!("npm {}: {e}", args.join(" ")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "npm {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let result = (|| {
        if !console.join("node_modules").is_dir() {
            run(&["ci", "--no-audit", "--no-fund"])?;
        }
        run(&["run", "build"])
    })();
    if let Err(e) = result {
        if has_dist {
            for line in e.lines().take(40) {
                warn(line);
            }
            warn("the console build failed: embedding the existing console/dist");
        } else {
            panic!("console/dist is missing and the console build failed:\n{e}");
        }
    }
}

/// FNV-1a 64 over the sorted relative paths of the inputs, each followed by a
/// NUL, the file's bytes and a NUL. `None` when there are no sources (a
/// packaged crate without the console directory).
fn source_hash(console: &Path) -> Option<String> {
    let mut files = Vec::new();
    for input in INPUTS {
        walk(console, &console.join(input), &mut files);
    }
    if files.is_empty() {
        return None;
    }
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for rel in &files {
        eat(rel.as_bytes());
        eat(&[0]);
        eat(&fs::read(console.join(rel)).expect("read console source"));
        eat(&[0]);
    }
    Some(format!("{h:016x}"))
}

fn walk(root: &Path, p: &Path, out: &mut Vec<String>) {
    let Ok(meta) = fs::metadata(p) else { return };
    if meta.is_dir() {
        let Ok(rd) = fs::read_dir(p) else { return };
        for e in rd.flatten() {
            walk(root, &e.path(), out);
        }
    } else if let Ok(rel) = p.strip_prefix(root) {
        let rel: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        out.push(rel.join("/"));
    }
}

fn mime(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "webp" => "image/webp",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "txt" => "text/plain; charset=utf-8",
        "webmanifest" => "application/manifest+json",
        _ => "application/octet-stream",
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The generated `assets.rs`: every file of dist (dot files left out).
fn generate(dist: &Path, sources: Option<&str>, built: Option<&str>) -> String {
    let mut files = Vec::new();
    walk(dist, dist, &mut files);
    files.retain(|f| !f.split('/').any(|part| part.starts_with('.')));
    files.sort();
    let mut s = String::new();
    s.push_str("// Generated by crates/console/build.rs from console/dist.\n\n");
    writeln!(
        s,
        "/// Hash of the console sources when this crate was built."
    )
    .unwrap();
    writeln!(s, "pub const SOURCE_HASH: Option<&str> = {sources:?};").unwrap();
    writeln!(
        s,
        "/// Hash of the sources the embedded dist was built from."
    )
    .unwrap();
    writeln!(s, "pub const DIST_HASH: Option<&str> = {built:?};").unwrap();
    s.push_str("pub static ASSETS: &[Asset] = &[\n");
    for f in &files {
        let full = dist.join(f);
        let bytes = fs::read(&full).expect("read dist file");
        let abs = full.canonicalize().expect("canonical dist path");
        writeln!(
            s,
            "    Asset {{ path: {f:?}, bytes: include_bytes!({abs:?}), content_type: {ct:?}, etag: \"\\\"{h:016x}\\\"\" }},",
            ct = mime(f),
            h = fnv(&bytes),
        )
        .unwrap();
    }
    s.push_str("];\n");
    s
}
