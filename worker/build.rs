//! The build id in the worker's default code version (`APP_VERSION`):
//! `BUILD_ID` when the build sets it (an image build passes its commit),
//! else the checkout's commit, else `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BUILD_ID");
    let id = std::env::var("BUILD_ID")
        .ok()
        .filter(|id| !id.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=WIDGET_BUILD_ID={id}");
}

/// The commit checked out, watching what moves it so a new commit rebuilds.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let git_dir = git(&["rev-parse", "--absolute-git-dir"])?;
    for watched in ["HEAD", "refs/heads", "packed-refs"] {
        let path = Path::new(&git_dir).join(watched);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}
