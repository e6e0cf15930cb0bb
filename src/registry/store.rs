//! The registry's state: schemas with global ids, subjects with versions, compatibility levels.
//! Pure: the server persists each change it makes to a Kafka topic and replays them on start.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::Schema;
use serde::{Deserialize, Serialize};

/// An error in Confluent Schema Registry's shape: an HTTP status and an `error_code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Confluent error code, e.g. 40401.
    pub error_code: u32,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    fn new(status: u16, error_code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            error_code,
            message: message.into(),
        }
    }

    /// 40401.
    pub fn subject_not_found(subject: &str) -> Self {
        Self::new(404, 40401, format!("Subject '{subject}' not found."))
    }

    /// 40402.
    pub fn version_not_found(version: &str) -> Self {
        Self::new(404, 40402, format!("Version {version} not found."))
    }

    /// 40403.
    pub fn schema_not_found() -> Self {
        Self::new(404, 40403, "Schema not found")
    }

    /// 42201.
    pub fn invalid_schema(detail: impl fmt::Display) -> Self {
        Self::new(422, 42201, format!("Invalid schema: {detail}"))
    }

    /// 42202.
    pub fn invalid_version(version: &str) -> Self {
        Self::new(
            422,
            42202,
            format!("The specified version '{version}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""),
        )
    }

    /// 42203.
    pub fn invalid_compatibility(level: &str) -> Self {
        Self::new(
            422,
            42203,
            format!("Invalid compatibility level '{level}'. Valid values are NONE, BACKWARD, FORWARD, FULL, BACKWARD_TRANSITIVE, FORWARD_TRANSITIVE, FULL_TRANSITIVE"),
        )
    }

    /// 409.
    pub fn incompatible(subject: &str, why: &str) -> Self {
        Self::new(409, 409, format!("Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{why}]"))
    }

    /// 50001.
    pub fn store(detail: impl fmt::Display) -> Self {
        Self::new(
            500,
            50001,
            format!("Error in the backend data store: {detail}"),
        )
    }
}

/// A compatibility level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Level {
    /// No check.
    None,
    /// New schema reads data of the latest.
    Backward,
    /// New schema reads data of all earlier.
    BackwardTransitive,
    /// Latest reads data of the new schema.
    Forward,
    /// All earlier read data of the new schema.
    ForwardTransitive,
    /// Backward and forward against the latest.
    Full,
    /// Backward and forward against all earlier.
    FullTransitive,
}

impl FromStr for Level {
    type Err = ApiError;

    fn from_str(s: &str) -> Result<Self, ApiError> {
        serde_json::from_value(serde_json::Value::String(s.to_uppercase()))
            .map_err(|_| ApiError::invalid_compatibility(s))
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// One change to the registry, as persisted and replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "keytype", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Change {
    /// A schema registered under a subject.
    Schema {
        /// Subject.
        subject: String,
        /// Version within the subject.
        version: i32,
        /// Global id.
        id: i32,
        /// The schema text as registered.
        schema: String,
    },
    /// A compatibility level set (globally when `subject` is `None`).
    Config {
        /// Subject, or `None` for the global level.
        subject: Option<String>,
        /// The level.
        level: Level,
    },
}

/// A registered version of a subject.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Registered {
    /// Subject.
    pub subject: String,
    /// Version.
    pub version: i32,
    /// Global id.
    pub id: i32,
    /// Schema text.
    pub schema: String,
}

/// The registry's state.
#[derive(Debug, Clone)]
pub struct Store {
    schemas: BTreeMap<i32, (String, String)>,
    ids: HashMap<String, i32>,
    subjects: BTreeMap<String, Vec<(i32, i32)>>,
    global: Level,
    levels: HashMap<String, Level>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            schemas: BTreeMap::new(),
            ids: HashMap::new(),
            subjects: BTreeMap::new(),
            global: Level::Backward,
            levels: HashMap::new(),
        }
    }
}

/// Whether `reader` reads everything `writer` writes. Partial compatibility (say, a writer's union
/// with a branch the reader cannot take) is incompatible, as in Avro's Java implementation.
fn readable(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => Err("only some of the writer's values can be read".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse(schema: &str) -> Result<(Schema, String), ApiError> {
    let parsed = Schema::parse_str(schema).map_err(ApiError::invalid_schema)?;
    let canonical = parsed.canonical_form();
    Ok((parsed, canonical))
}

impl Store {
    /// Applies a persisted change.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Schema {
                subject,
                version,
                id,
                schema,
            } => {
                let canonical = parse(schema)
                    .map(|(_, c)| c)
                    .unwrap_or_else(|_| schema.clone());
                self.schemas
                    .entry(*id)
                    .or_insert_with(|| (schema.clone(), canonical.clone()));
                self.ids.entry(canonical).or_insert(*id);
                let versions = self.subjects.entry(subject.clone()).or_default();
                if !versions.iter().any(|(v, _)| v == version) {
                    versions.push((*version, *id));
                }
            }
            Change::Config {
                subject: None,
                level,
            } => self.global = *level,
            Change::Config {
                subject: Some(s),
                level,
            } => {
                self.levels.insert(s.clone(), *level);
            }
        }
    }

    /// The change that registering `schema` under `subject` makes (`None` if it is already
    /// registered there), or why it is refused. Apply the change once it is persisted.
    pub fn register(&self, subject: &str, schema: &str) -> Result<(Option<Change>, i32), ApiError> {
        let (parsed, canonical) = parse(schema)?;
        if let Some(existing) = self.lookup_canonical(subject, &canonical) {
            return Ok((None, existing.id));
        }
        self.check(subject, &parsed, None)?;
        let id = self
            .ids
            .get(&canonical)
            .copied()
            .unwrap_or_else(|| self.schemas.keys().next_back().map_or(1, |l| l + 1));
        let version = self
            .subjects
            .get(subject)
            .and_then(|v| v.iter().map(|(v, _)| *v).max())
            .map_or(1, |v| v + 1);
        Ok((
            Some(Change::Schema {
                subject: subject.into(),
                version,
                id,
                schema: schema.into(),
            }),
            id,
        ))
    }

    fn lookup_canonical(&self, subject: &str, canonical: &str) -> Option<Registered> {
        let id = *self.ids.get(canonical)?;
        let (version, _) = self.subjects.get(subject)?.iter().find(|(_, i)| *i == id)?;
        self.version(subject, &version.to_string()).ok()
    }

    /// The version of `subject` that has `schema`.
    pub fn lookup(&self, subject: &str, schema: &str) -> Result<Registered, ApiError> {
        if !self.subjects.contains_key(subject) {
            return Err(ApiError::subject_not_found(subject));
        }
        let (_, canonical) = parse(schema)?;
        self.lookup_canonical(subject, &canonical)
            .ok_or_else(ApiError::schema_not_found)
    }

    /// Whether `schema` may be registered under `subject` (against `version` only, if given).
    pub fn compatible(
        &self,
        subject: &str,
        schema: &str,
        version: Option<&str>,
    ) -> Result<Result<(), String>, ApiError> {
        let (parsed, _) = parse(schema)?;
        if let Some(v) = version {
            self.version(subject, v)?;
        } else if !self.subjects.contains_key(subject) {
            return Ok(Ok(()));
        }
        match self.check(subject, &parsed, version) {
            Ok(()) => Ok(Ok(())),
            Err(e) if e.error_code == 409 => Ok(Err(e.message)),
            Err(e) => Err(e),
        }
    }

    fn check(&self, subject: &str, new: &Schema, only: Option<&str>) -> Result<(), ApiError> {
        let level = self.level(Some(subject));
        let Some(versions) = self.subjects.get(subject).filter(|v| !v.is_empty()) else {
            return Ok(());
        };
        let against: Vec<i32> = match (only, level) {
            (Some(v), _) => vec![self.version(subject, v)?.id],
            (None, Level::None) => return Ok(()),
            (
                None,
                Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive,
            ) => versions.iter().map(|(_, id)| *id).collect(),
            (None, _) => versions
                .iter()
                .max_by_key(|(v, _)| *v)
                .map(|(_, id)| *id)
                .into_iter()
                .collect(),
        };
        let (backward, forward) = match level {
            Level::None if only.is_none() => return Ok(()),
            Level::Backward | Level::BackwardTransitive | Level::None => (true, false),
            Level::Forward | Level::ForwardTransitive => (false, true),
            Level::Full | Level::FullTransitive => (true, true),
        };
        for id in against {
            let (text, _) = &self.schemas[&id];
            let old = Schema::parse_str(text).map_err(ApiError::store)?;
            if backward {
                readable(&old, new).map_err(|e| {
                    ApiError::incompatible(subject, &format!("{{newSchemaCannotReadOldData: {e}}}"))
                })?;
            }
            if forward {
                readable(new, &old).map_err(|e| {
                    ApiError::incompatible(subject, &format!("{{oldSchemaCannotReadNewData: {e}}}"))
                })?;
            }
        }
        Ok(())
    }

    /// The compatibility level of `subject` (or the global one).
    pub fn level(&self, subject: Option<&str>) -> Level {
        subject
            .and_then(|s| self.levels.get(s))
            .copied()
            .unwrap_or(self.global)
    }

    /// Whether `subject` has its own level.
    pub fn has_level(&self, subject: &str) -> bool {
        self.levels.contains_key(subject)
    }

    /// The schema text with global `id`.
    pub fn schema(&self, id: i32) -> Result<&str, ApiError> {
        self.schemas
            .get(&id)
            .map(|(s, _)| s.as_str())
            .ok_or_else(ApiError::schema_not_found)
    }

    /// Every subject.
    pub fn subjects(&self) -> Vec<&str> {
        self.subjects.keys().map(String::as_str).collect()
    }

    /// The versions of `subject`.
    pub fn versions(&self, subject: &str) -> Result<Vec<i32>, ApiError> {
        let versions = self
            .subjects
            .get(subject)
            .ok_or_else(|| ApiError::subject_not_found(subject))?;
        let mut out: Vec<i32> = versions.iter().map(|(v, _)| *v).collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Version `version` (a number or `latest`) of `subject`.
    pub fn version(&self, subject: &str, version: &str) -> Result<Registered, ApiError> {
        let versions = self
            .subjects
            .get(subject)
            .ok_or_else(|| ApiError::subject_not_found(subject))?;
        let wanted = match version {
            "latest" | "-1" => versions.iter().map(|(v, _)| *v).max(),
            v => match v.parse::<i32>() {
                Ok(n) if n >= 1 => Some(n),
                _ => return Err(ApiError::invalid_version(v)),
            },
        };
        let (v, id) = wanted
            .and_then(|w| versions.iter().find(|(v, _)| *v == w).copied())
            .ok_or_else(|| ApiError::version_not_found(version))?;
        Ok(Registered {
            subject: subject.into(),
            version: v,
            id,
            schema: self.schemas[&id].0.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"string"}]}"#;
    const V2_DEFAULT: &str = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"string"},{"name":"b","type":["null","int"],"default":null}]}"#;
    const V2_REQUIRED: &str = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"string"},{"name":"b","type":"int"}]}"#;
    const V0_EMPTY: &str = r#"{"type":"record","name":"T","fields":[]}"#;

    fn register(store: &mut Store, subject: &str, schema: &str) -> Result<i32, ApiError> {
        let (change, id) = store.register(subject, schema)?;
        if let Some(c) = change {
            store.apply(&c);
        }
        Ok(id)
    }

    #[test]
    fn the_same_schema_gets_the_same_id_across_subjects_and_whitespace() {
        let mut s = Store::default();
        let a = register(&mut s, "x-value", V1).unwrap();
        let again = register(&mut s, "x-value", &V1.replace(',', " , ")).unwrap();
        let other = register(&mut s, "y-value", V1).unwrap();
        assert_eq!((a, again, other), (1, 1, 1));
        assert_eq!(s.versions("x-value").unwrap(), vec![1]);
    }

    #[test]
    fn backward_accepts_an_optional_field_and_refuses_a_required_one() {
        let mut s = Store::default();
        register(&mut s, "t", V1).unwrap();
        assert_eq!(register(&mut s, "t", V2_DEFAULT).unwrap(), 2);
        let err = register(&mut s, "t", V2_REQUIRED).unwrap_err();
        assert_eq!((err.status, err.error_code), (409, 409));
    }

    #[test]
    fn full_refuses_removing_a_field_without_a_default() {
        let mut s = Store::default();
        s.apply(&Change::Config {
            subject: Some("t".into()),
            level: Level::Full,
        });
        register(&mut s, "t", V1).unwrap();
        let err = register(&mut s, "t", V0_EMPTY).unwrap_err();
        assert_eq!(err.error_code, 409, "{err}");
        assert!(err.message.contains("oldSchemaCannotReadNewData"), "{err}");
    }

    #[test]
    fn errors_have_confluent_codes() {
        let s = Store::default();
        assert_eq!(s.versions("nope").unwrap_err().error_code, 40401);
        assert_eq!(s.schema(7).unwrap_err().error_code, 40403);
        assert_eq!(
            Store::default()
                .register("t", "{not json")
                .unwrap_err()
                .error_code,
            42201
        );
        assert_eq!("sideways".parse::<Level>().unwrap_err().error_code, 42203);
    }
}
