//! Prints `policy explain` output for a policy file: `cargo run -p policy --example explain FILE`.

fn main() {
    let Some(file) = std::env::args_os().nth(1) else {
        eprintln!("usage: explain POLICY.json");
        std::process::exit(2);
    };
    let path = std::path::PathBuf::from(file);
    let result = policy::load_file(&path).and_then(|p| {
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        let view = policy::resolve_fs(&p.filesystem, base)?;
        Ok(policy::explain_text(&p, &view))
    });
    match result {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(125);
        }
    }
}
