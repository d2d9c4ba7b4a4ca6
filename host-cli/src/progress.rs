//! Progress display for long work (the guest image build).

use std::io::{IsTerminal, Write};

use guest_image::{Progress, Stage};

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Extract => "extract",
        Stage::Patch => "patch",
        Stage::Configure => "configure",
        Stage::Compile => "compile",
        Stage::Initramfs => "initramfs",
        Stage::Rootfs => "rootfs",
        Stage::Done => "done",
        _ => "build",
    }
}

/// A progress reporter on stderr: a redrawn bar on a terminal, a line per stage (and
/// per 10 % of compilation) otherwise; JSON lines with `json`.
pub fn reporter(json: bool) -> impl FnMut(Progress) + Send {
    let tty = std::io::stderr().is_terminal();
    let mut last_stage: Option<Stage> = None;
    let mut last_tenth: i64 = -1;
    move |p: Progress| {
        let mut err = std::io::stderr().lock();
        if json {
            let line = serde_json::json!({
                "type": "progress", "stage": stage_name(p.stage),
                "fraction": p.fraction, "message": p.message,
            });
            let _ = writeln!(std::io::stdout().lock(), "{line}");
            return;
        }
        let pct = p.fraction.map(|f| (f * 100.0).clamp(0.0, 100.0));
        if tty {
            let filled = pct.map_or(0, |x| (x / 5.0) as usize);
            let bar: String = "#".repeat(filled) + &".".repeat(20 - filled.min(20));
            let mut msg = p.message.clone();
            msg.truncate(50);
            let _ = write!(
                err,
                "\r\x1b[2Kimage: [{bar}] {:<9} {:>3}% {msg}",
                stage_name(p.stage),
                pct.map_or(0, |x| x as u32)
            );
            if p.stage == Stage::Done {
                let _ = writeln!(err);
            }
        } else {
            let tenth = pct.map_or(-1, |x| (x / 10.0) as i64);
            if last_stage != Some(p.stage) || tenth != last_tenth {
                let _ = writeln!(
                    err,
                    "image: {} {}{}",
                    stage_name(p.stage),
                    pct.map_or(String::new(), |x| format!("{x:.0}% ")),
                    p.message
                );
            }
            last_tenth = tenth;
        }
        last_stage = Some(p.stage);
    }
}
