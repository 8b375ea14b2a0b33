//! The README's configuration table says what the binaries do: every
//! variable it lists is one `--help` shows for the binaries it names, with
//! the same default, and every variable `--help` shows is in the table.

use std::collections::BTreeMap;
use std::path::Path;

use harness::bin;

/// A variable as `--help` shows it: its default, if it has one.
type Help = BTreeMap<String, Option<String>>;

fn help(binary: &str) -> Help {
    let output = std::process::Command::new(bin(binary))
        .arg("--help")
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "{binary} --help");
    let text = String::from_utf8(output.stdout).expect("UTF-8 help");
    let mut variables = Help::new();
    for entry in text.split("[env: ").skip(1) {
        let name: String = entry
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        // The default, when the same flag has one, comes before the next flag.
        let flag = entry.split("\n      --").next().unwrap_or(entry);
        let default = flag
            .split_once("[default: ")
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(default, _)| default.to_owned());
        variables.insert(name, default);
    }
    variables
}

/// The README's configuration rows: variable, default cell, who.
fn readme_rows() -> Vec<(String, String, String)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let section = readme
        .split("## Configuration")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Configuration section");
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            let name = cells[0]
                .trim_start_matches("| ")
                .trim_matches('`')
                .to_owned();
            (name, cells[1].to_owned(), cells[2].to_owned())
        })
        .collect()
}

#[test]
fn the_configuration_table_matches_each_binarys_help() {
    let binaries = [
        ("api", help("widget-api")),
        ("worker", help("widget-worker")),
    ];
    let rows = readme_rows();
    assert!(rows.len() > 10, "the table was found: {rows:?}");
    for (name, default_cell, who) in &rows {
        let documented_default = default_cell
            .strip_prefix('`')
            .and_then(|rest| rest.split_once('`'))
            .map(|(default, _)| default.to_owned());
        for (binary, variables) in &binaries {
            let expected = who == "both" || who == binary;
            assert_eq!(
                variables.contains_key(name),
                expected,
                "README says {name} is for {who}; widget-{binary} --help disagrees"
            );
            if let Some(default) = variables.get(name) {
                assert_eq!(
                    &documented_default, default,
                    "the README's default of {name} is not widget-{binary}'s"
                );
            }
        }
    }
    for (binary, variables) in &binaries {
        for name in variables.keys() {
            assert!(
                rows.iter().any(|(documented, ..)| documented == name),
                "widget-{binary} reads {name}, which the README's table does not list"
            );
        }
    }
}
