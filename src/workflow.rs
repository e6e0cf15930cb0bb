//! A workflow directory: `cards/*.yaml` and `rules.yaml`.

use std::path::{Path, PathBuf};

use crate::cards::Cards;
use crate::router::Engine;
use crate::rules::RuleTable;

/// Errors loading a workflow: the card or rule file and what is wrong.
pub use crate::files::{Error, Result};

/// A loaded, checked workflow.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// The workflow's directory.
    pub dir: PathBuf,
    /// Its cards.
    pub cards: Cards,
    /// Its rule table.
    pub rules: RuleTable,
}

impl Workflow {
    /// Loads `dir/cards/*.yaml` and `rules` (default `dir/rules.yaml`).
    pub fn load(dir: &Path, rules: Option<&Path>) -> Result<Self> {
        let cards = Cards::load_dir(&dir.join("cards"))?;
        let rules_path = rules.map_or_else(|| dir.join("rules.yaml"), Path::to_path_buf);
        let rules = RuleTable::load(&rules_path, &cards)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cards,
            rules,
        })
    }

    /// The decision engine of this workflow, with the cards' signing secrets read from the
    /// environment.
    pub fn engine(&self) -> Engine {
        Engine {
            cards: self.cards.clone(),
            rules: self.rules.clone(),
            secrets: self.cards.secrets(),
        }
    }
}
