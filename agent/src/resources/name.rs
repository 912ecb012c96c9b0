//! `namespace/name`, the key Kubernetes objects are known by.
use std::fmt;

/// A namespaced object's name, displayed as `namespace/name` (the form MeshState keys and log
/// lines use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

impl<'a> NamespacedName<'a> {
    pub fn new(namespace: &'a str, name: &'a str) -> Self {
        Self { namespace, name }
    }

    /// Splits `namespace/name` at its first `/`.
    pub fn parse(key: &'a str) -> Option<Self> {
        let (namespace, name) = key.split_once('/')?;
        Some(Self { namespace, name })
    }

    /// The `namespace/name` key.
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for NamespacedName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_and_parses_namespace_slash_name() {
        let n = NamespacedName::new("shop", "web");
        assert_eq!(n.key(), "shop/web");
        assert_eq!(NamespacedName::parse("shop/web"), Some(n));
        assert_eq!(NamespacedName::parse("web"), None);
    }
}
