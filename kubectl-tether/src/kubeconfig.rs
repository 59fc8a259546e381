//! The namespace of the kubeconfig's current context, read the way kubectl merges its files
//! (`KUBECONFIG`, a `:`-separated list, else `~/.kube/config`; the first file to set
//! `current-context` wins, and so does the first context of a name). Only that: the plugin
//! talks to the gateway, never to the API server.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
struct File {
    #[serde(rename = "current-context", default)]
    current_context: Option<String>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
}

#[derive(Debug, Deserialize)]
struct NamedContext {
    name: String,
    #[serde(default)]
    context: Option<Context>,
}

#[derive(Debug, Deserialize)]
struct Context {
    #[serde(default)]
    namespace: Option<String>,
}

fn files() -> Vec<PathBuf> {
    match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(list) => std::env::split_paths(&list)
            .filter(|p| !p.as_os_str().is_empty())
            .collect(),
        None => std::env::var_os("HOME")
            .map(|h| vec![PathBuf::from(h).join(".kube").join("config")])
            .unwrap_or_default(),
    }
}

/// The current context's namespace in these kubeconfig texts, merged in order.
fn namespace_in(texts: &[String]) -> Option<String> {
    let parsed: Vec<File> = texts
        .iter()
        .filter_map(|t| serde_yaml_ng::from_str(t).ok())
        .collect();
    let current = parsed
        .iter()
        .find_map(|f| f.current_context.clone().filter(|c| !c.is_empty()))?;
    parsed
        .iter()
        .flat_map(|f| &f.contexts)
        .find(|c| c.name == current)?
        .context
        .as_ref()?
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
}

/// The current context's namespace, else `default`.
pub fn default_namespace() -> String {
    let texts: Vec<String> = files()
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    namespace_in(&texts).unwrap_or_else(|| "default".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_current_context_and_first_context_of_its_name_win() {
        let a = "apiVersion: v1\nkind: Config\ncurrent-context: dev\ncontexts:\n\
                 - name: other\n  context: {cluster: c, namespace: nope}\n"
            .to_owned();
        let b = "current-context: ignored\ncontexts:\n\
                 - name: dev\n  context: {cluster: c, user: u, namespace: team-a}\n\
                 - name: dev\n  context: {namespace: later}\n"
            .to_owned();
        assert_eq!(namespace_in(&[a.clone(), b]).as_deref(), Some("team-a"));
        // A context without a namespace, or no current context, says nothing.
        let c = "current-context: x\ncontexts:\n- name: x\n  context: {cluster: c}\n".to_owned();
        assert_eq!(namespace_in(&[c]), None);
        assert_eq!(namespace_in(&["contexts: []".into()]), None);
        assert_eq!(namespace_in(&["{not yaml".into()]), None);
    }
}
