//! Validated relative paths: the only kind of path a backend accepts from a volume ID or a
//! template. Nothing built from a `RelPath` can leave the base it is joined to.

use std::fmt;

use crate::error::{Error, Result};

/// Longest single component we create; well under NAME_MAX (255) everywhere.
pub const MAX_COMPONENT: usize = 200;

/// A non-empty relative path of `/`-separated components, none of them empty, `.` or `..`,
/// none containing NUL or a control character.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

impl RelPath {
    /// Parses `s`, naming `field` in the error.
    pub fn parse(field: &'static str, s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::invalid(field, "must not be empty"));
        }
        if s.starts_with('/') {
            return Err(Error::invalid(field, "must be a relative path"));
        }
        for comp in s.split('/') {
            check_component(field, comp)?;
        }
        Ok(RelPath(s.to_owned()))
    }

    /// One component, e.g. a directory name derived from a volume name.
    pub fn component(field: &'static str, s: &str) -> Result<Self> {
        check_component(field, s)?;
        Ok(RelPath(s.to_owned()))
    }

    pub fn join(&self, child: &str) -> Result<Self> {
        RelPath::parse("path", &format!("{}/{}", self.0, child))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Parent path, or None for a single component.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rsplit_once('/').map(|(p, _)| RelPath(p.to_owned()))
    }

    pub fn file_name(&self) -> &str {
        self.0.rsplit_once('/').map_or(self.0.as_str(), |(_, n)| n)
    }
}

fn check_component(field: &'static str, comp: &str) -> Result<()> {
    if comp.is_empty() {
        return Err(Error::invalid(field, "has an empty path component"));
    }
    if comp == "." || comp == ".." {
        return Err(Error::invalid(
            field,
            "must not contain '.' or '..' components",
        ));
    }
    if comp.len() > MAX_COMPONENT {
        return Err(Error::invalid(
            field,
            format!("path component longer than {MAX_COMPONENT} bytes"),
        ));
    }
    if comp
        .chars()
        .any(|c| c == '\0' || c.is_control() || c == '/' || c == '\\')
    {
        return Err(Error::invalid(
            field,
            "contains NUL, a control character or a backslash",
        ));
    }
    Ok(())
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_paths() {
        assert_eq!(
            RelPath::parse("p", "a/b-c_d.e").unwrap().as_str(),
            "a/b-c_d.e"
        );
        assert_eq!(
            RelPath::parse("p", "a/b")
                .unwrap()
                .parent()
                .unwrap()
                .as_str(),
            "a"
        );
        assert_eq!(RelPath::parse("p", "a/b").unwrap().file_name(), "b");
    }

    #[test]
    fn refuses_escapes() {
        for bad in [
            "", "/etc", "a/../b", "..", ".", "a//b", "a/", "a\0b", "a\\b", "a\nb",
        ] {
            let err = RelPath::parse("volume_id", bad).unwrap_err();
            assert!(err.to_string().contains("volume_id"), "{bad:?}: {err}");
        }
        assert!(RelPath::component("name", &"x".repeat(MAX_COMPONENT + 1)).is_err());
        assert!(RelPath::component("name", "a/b").is_err());
    }
}
