//! placeholder until the CUDA backend lands
use llama2::{DType, LanguageModel, ModelWeights, Result};
pub fn load_model(_w: &ModelWeights, _dtype: Option<DType>) -> Result<Box<dyn LanguageModel>> {
    Err(llama2::Error::Backend("not built".into()))
}
pub fn unavailable_reason() -> Option<String> {
    Some("this build has no CUDA backend".into())
}
