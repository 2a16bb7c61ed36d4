//! spacectl's YAML output (`-o yaml`): the JSON a command would print, as a block-style
//! YAML document.

/// `value` as a YAML document (block style, two-space indent, keys in the order `--json` prints
/// them), as
/// `spacectl -o yaml` prints it. Strings stay plain where YAML would read them back as the
/// same string, else they are double-quoted (JSON's escapes are YAML's).
pub fn yaml(value: &serde_json::Value) -> String {
    let mut out = String::new();
    yaml_node(value, 0, &mut out);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn yaml_scalar(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    Some(match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => yaml_string(s),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        _ => return None,
    })
}

/// A string plain if that reads back as itself, else double-quoted.
fn yaml_string(s: &str) -> String {
    const WORDS: [&str; 12] = [
        "null", "true", "false", "yes", "no", "on", "off", "y", "n", "~", ".nan", ".inf",
    ];
    let plain = !s.is_empty()
        && !WORDS.contains(&s.to_ascii_lowercase().as_str())
        && s.parse::<f64>().is_err()
        && !s.starts_with(|c: char| " -?:,[]{}#&*!|>'\"%@`.".contains(c))
        && !s.ends_with([' ', ':'])
        && !s.contains(": ")
        && !s.contains(" #")
        && s.chars().all(|c| !c.is_control());
    if plain {
        s.to_string()
    } else {
        serde_json::Value::String(s.to_string()).to_string()
    }
}

fn yaml_node(value: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    let pad = " ".repeat(indent);
    match value {
        Value::Object(o) if !o.is_empty() => {
            for (k, v) in o {
                out.push_str(&pad);
                out.push_str(&yaml_string(k));
                out.push(':');
                // A list under a key sits at the key's indent, as kubectl prints it.
                let inner = if v.is_array() { indent } else { indent + 2 };
                yaml_child(v, inner, out, false);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for v in a {
                out.push_str(&pad);
                out.push('-');
                yaml_child(v, indent + 2, out, true);
            }
        }
        scalar => {
            out.push_str(&pad);
            out.push_str(&yaml_scalar(scalar).unwrap_or_default());
            out.push('\n');
        }
    }
}

/// What follows a key's colon or an item's dash: a scalar on the same line, else the nested
/// block at `indent`, on the next line (a key's) or starting on the same line (an item's:
/// its first line follows the dash, the rest align under it).
fn yaml_child(v: &serde_json::Value, indent: usize, out: &mut String, item: bool) {
    match yaml_scalar(v) {
        Some(s) => {
            out.push(' ');
            out.push_str(&s);
            out.push('\n');
        }
        None if item => {
            let mut block = String::new();
            yaml_node(v, indent, &mut block);
            out.push(' ');
            out.push_str(block.trim_start_matches(' '));
        }
        None => {
            out.push('\n');
            yaml_node(v, indent, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::yaml;
    use serde_json::json;

    #[test]
    fn maps_lists_and_scalars_in_block_style() {
        let v = json!({
            "leader": 1,
            "nodes": [
                {"id": 1, "name": "n1", "roles": ["ha", "app"], "voter": true},
                {"id": 2, "name": "n2", "roles": [], "mgmt_ip": null}
            ],
            "lease": {"epoch": 3, "owner": "n1"},
            "empty": {}
        });
        assert_eq!(
            yaml(&v),
            "empty: {}\nleader: 1\nlease:\n  epoch: 3\n  owner: n1\nnodes:\n- id: 1\n  name: n1\n  roles:\n\
             \x20 - ha\n  - app\n  voter: true\n- id: 2\n  mgmt_ip: null\n  name: n2\n  roles: []\n"
        );
    }

    #[test]
    fn strings_yaml_would_misread_are_quoted() {
        let v = json!([
            "true",
            "no",
            "12",
            "1.5",
            "",
            "-x",
            ": x",
            "a: b",
            "a #b",
            "x\ny",
            "10.0.0.1:830",
            "127.0.0.1",
            "n1",
            "up since 3s",
            "*",
            "[x]"
        ]);
        assert_eq!(
            yaml(&v),
            "- \"true\"\n- \"no\"\n- \"12\"\n- \"1.5\"\n- \"\"\n- \"-x\"\n- \": x\"\n- \"a: b\"\n\
             - \"a #b\"\n- \"x\\ny\"\n- 10.0.0.1:830\n- 127.0.0.1\n- n1\n- up since 3s\n- \"*\"\n- \"[x]\"\n"
        );
        assert_eq!(yaml(&json!("plain")), "plain\n");
        assert_eq!(
            yaml(&json!([[1, 2], {"a": [{"b": 1}]}])),
            "- - 1\n  - 2\n- a:\n  - b: 1\n"
        );
    }
}
