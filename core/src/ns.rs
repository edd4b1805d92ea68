//! Namespaces: a tenant's private world of results.
//!
//! Every session belongs to one namespace, named by its credential; every
//! key it uses carries that namespace ([`crate::key::Key::ns`]), so the wait
//! table, the cache and the cluster's Redis names keep namespaces apart
//! without any of them knowing what a namespace is. A name is interned once
//! for the life of the process and travels as a small copyable [`Ns`];
//! how many distinct names may be interned is bounded
//! (`auth.max_namespaces`), since signed tokens can name new ones.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

/// An interned namespace name. `Ns::SHARED` is `""`, the namespace of
/// every session without a namespace of its own.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ns(u32);

/// The most bytes a namespace name may have.
pub const MAX_NAME_BYTES: usize = 64;

#[derive(Default)]
struct Names {
    ids: HashMap<Arc<str>, Ns>,
    names: Vec<Arc<str>>,
}

fn names() -> &'static RwLock<Names> {
    static NAMES: OnceLock<RwLock<Names>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let shared: Arc<str> = "".into();
        RwLock::new(Names {
            ids: HashMap::from([(Arc::clone(&shared), Ns::SHARED)]),
            names: vec![shared],
        })
    })
}

/// Why a namespace name is not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not 1 to 64 of `A-Z a-z 0-9 _ - .` (or `""`).
    BadName,
    /// `auth.max_namespaces` names are known already.
    TooMany,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::BadName => write!(
                f,
                "a namespace is at most {MAX_NAME_BYTES} of A-Z a-z 0-9 _ - ., the first a letter or digit"
            ),
            Refused::TooMany => f.write_str("too many namespaces (auth.max_namespaces)"),
        }
    }
}

/// Whether `name` may name a namespace: `""`, or 1 to 64 of
/// `A-Z a-z 0-9 _ - .` beginning with a letter or digit (safe in Redis
/// names, metric labels and logs; the metric labels `_shared` and `_other`
/// cannot be namespaces).
pub fn valid_name(name: &str) -> bool {
    name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl Ns {
    /// The shared namespace, `""`.
    pub const SHARED: Ns = Ns(0);

    /// The namespace named `name`, interned if new while fewer than `max`
    /// names are known.
    pub fn intern(name: &str, max: usize) -> Result<Ns, Refused> {
        if !valid_name(name) {
            return Err(Refused::BadName);
        }
        if let Some(ns) = names().read().expect("not poisoned").ids.get(name) {
            return Ok(*ns);
        }
        let mut names = names().write().expect("not poisoned");
        if let Some(ns) = names.ids.get(name) {
            return Ok(*ns);
        }
        if names.names.len() >= max.max(1) {
            return Err(Refused::TooMany);
        }
        let ns = Ns(names.names.len() as u32);
        let name: Arc<str> = name.into();
        names.ids.insert(Arc::clone(&name), ns);
        names.names.push(name);
        Ok(ns)
    }

    /// The namespace named `name` if it is known.
    pub fn find(name: &str) -> Option<Ns> {
        names().read().expect("not poisoned").ids.get(name).copied()
    }

    /// Its name.
    pub fn name(self) -> Arc<str> {
        let names = names().read().expect("not poisoned");
        Arc::clone(&names.names[self.0 as usize])
    }

    /// Its number, in the order names were first interned.
    pub fn id(self) -> u32 {
        self.0
    }

    pub fn is_shared(self) -> bool {
        self == Ns::SHARED
    }
}

impl fmt::Debug for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ns({:?})", &*self.name())
    }
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_interned_once_and_checked() {
        let a = Ns::intern("team-a", 1000).unwrap();
        assert_eq!(Ns::intern("team-a", 1000).unwrap(), a);
        assert_eq!(&*a.name(), "team-a");
        assert_eq!(Ns::intern("", 1000).unwrap(), Ns::SHARED);
        assert_eq!(Ns::intern("a:b", 1000), Err(Refused::BadName));
        assert_eq!(Ns::intern("_other", 1000), Err(Refused::BadName));
        assert_eq!(Ns::intern(&"x".repeat(65), 1000), Err(Refused::BadName));
        assert_eq!(Ns::intern("never-seen-before", 1), Err(Refused::TooMany));
        assert_eq!(Ns::find("team-a"), Some(a));
    }

    #[test]
    fn a_namespace_shows_its_name_and_number() {
        assert_eq!(Ns::SHARED.id(), 0);
        let first = Ns::intern("ns-first", 1000).unwrap();
        let second = Ns::intern("ns-second", 1000).unwrap();
        assert!(first.id() > 0 && second.id() > 0 && first.id() != second.id());
        assert_eq!(format!("{first:?}"), "Ns(\"ns-first\")");
        assert_eq!(first.to_string(), "ns-first");
        assert!(Refused::BadName.to_string().contains("at most 64"));
        assert!(Refused::TooMany.to_string().contains("auth.max_namespaces"));
    }
}
