//! Every Rust snippet of the README and the guide (docs/) is compiled: each block is a region of
//! examples/guide.rs, named by a `<!-- snippet: NAME -->` line above it, and must be that
//! region line for line (so the Markdown cannot drift from code that `cargo test` builds).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const GUIDE: &str = "examples/guide.rs";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown files a user reads: the README and every page of docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("read docs/")
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The guide's regions by name, without their common indentation.
fn regions(source: &str) -> BTreeMap<String, String> {
    let mut regions = BTreeMap::new();
    let mut open: Option<(String, Vec<&str>)> = None;
    for (n, line) in source.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix("// snippet: ") {
            assert!(open.is_none(), "{GUIDE}:{}: a snippet starts inside another", n + 1);
            open = Some((name.to_owned(), Vec::new()));
        } else if trimmed == "// end snippet" {
            let (name, lines) =
                open.take().unwrap_or_else(|| panic!("{GUIDE}:{}: an end without a start", n + 1));
            let indent = lines
                .iter()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.len() - l.trim_start().len())
                .min()
                .unwrap_or(0);
            let body: Vec<&str> =
                lines.iter().map(|l| if l.len() >= indent { &l[indent..] } else { "" }).collect();
            assert!(regions.insert(name.clone(), body.join("\n")).is_none(), "{GUIDE}: snippet {name} twice");
        } else if let Some((_, lines)) = open.as_mut() {
            lines.push(line);
        }
    }
    assert!(open.is_none(), "{GUIDE}: a snippet is never ended");
    regions
}

/// The page's Rust blocks: (line, the name above it, its text).
fn blocks(page: &Path, text: &str) -> Vec<(usize, Option<String>, String)> {
    let mut blocks = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut n = 0;
    while n < lines.len() {
        let fence = lines[n].trim_start();
        if fence.starts_with("```rust") {
            let name = lines[..n]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| l.trim().strip_prefix("<!-- snippet: "))
                .and_then(|l| l.strip_suffix(" -->"))
                .map(str::to_owned);
            let end = lines[n + 1..]
                .iter()
                .position(|l| l.trim_start().starts_with("```"))
                .unwrap_or_else(|| panic!("{}:{}: a Rust block is never closed", page.display(), n + 1));
            blocks.push((n + 1, name, lines[n + 1..n + 1 + end].join("\n")));
            n += end + 2;
        } else {
            n += 1;
        }
    }
    blocks
}

#[test]
fn every_rust_snippet_is_a_region_of_the_compiled_guide() {
    let source = std::fs::read_to_string(root().join(GUIDE)).expect("read the guide example");
    let regions = regions(&source);
    let mut used = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("read a page");
        let shown = page.strip_prefix(root()).unwrap_or(&page).display().to_string();
        for (line, name, block) in blocks(&page, &text) {
            let Some(name) = name else {
                problems.push(format!(
                    "{shown}:{line}: a Rust block without a `<!-- snippet: NAME -->` line above it"
                ));
                continue;
            };
            match regions.get(&name) {
                None => problems.push(format!("{shown}:{line}: snippet {name} is not in {GUIDE}")),
                Some(region) if *region != block => {
                    problems.push(format!("{shown}:{line}: snippet {name} differs from {GUIDE}:\n--- page\n{block}\n--- {GUIDE}\n{region}"))
                }
                Some(_) => {
                    used.insert(name);
                }
            }
        }
    }
    for name in regions.keys().filter(|name| !used.contains(*name)) {
        problems.push(format!("{GUIDE}: snippet {name} is shown on no page"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_block_differing_from_its_region_is_found() {
    let regions = regions("fn f() {\n    // snippet: a\n    let x = 1;\n    // end snippet\n}\n");
    assert_eq!(regions["a"], "let x = 1;");
    let page = "<!-- snippet: a -->\n```rust\nlet x = 2;\n```\n";
    let blocks = blocks(Path::new("page.md"), page);
    assert_eq!(blocks, vec![(2, Some("a".to_owned()), "let x = 2;".to_owned())]);
    assert_ne!(regions["a"], blocks[0].2);
}
