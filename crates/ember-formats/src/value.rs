//! GGUF metadata values.

/// The value type ids of GGUF metadata (`gguf_type` in ggml).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetaType {
    /// An unsigned 8-bit integer.
    U8 = 0,
    /// A signed 8-bit integer.
    I8 = 1,
    /// An unsigned 16-bit integer.
    U16 = 2,
    /// A signed 16-bit integer.
    I16 = 3,
    /// An unsigned 32-bit integer.
    U32 = 4,
    /// A signed 32-bit integer.
    I32 = 5,
    /// A 32-bit IEEE float.
    F32 = 6,
    /// A bool, stored as one byte (0 or 1).
    Bool = 7,
    /// A UTF-8 string: u64 byte length, then the bytes (no terminator).
    String = 8,
    /// An array: u32 element type, u64 count, then the elements (arrays may nest).
    Array = 9,
    /// An unsigned 64-bit integer.
    U64 = 10,
    /// A signed 64-bit integer.
    I64 = 11,
    /// A 64-bit IEEE float.
    F64 = 12,
}

impl MetaType {
    /// The type for an id, `None` outside the spec.
    pub fn from_id(id: u32) -> Option<MetaType> {
        use MetaType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The id stored in the file.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Encoded size of one value of this type, `None` for strings and arrays.
    pub fn fixed_size(self) -> Option<usize> {
        use MetaType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }

    /// The minimum encoded size of one value of this type (a string is at least its u64
    /// length; an array at least its u32 element type and u64 count).
    pub fn min_size(self) -> usize {
        match self {
            MetaType::String => 8,
            MetaType::Array => 12,
            t => t.fixed_size().unwrap_or(1),
        }
    }

    /// Lower-case name (`u32`, `string`, ...).
    pub fn name(self) -> &'static str {
        use MetaType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

impl std::fmt::Display for MetaType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value. The variant is the type written to the file; `From` conversions from
/// the Rust scalars, `String`, `&str`, `Vec<T>` and [`MetaArray`] pick it
/// (`GgufWriter::add(key, 2u32)` writes a u32).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// An unsigned 8-bit integer.
    U8(u8),
    /// A signed 8-bit integer.
    I8(i8),
    /// An unsigned 16-bit integer.
    U16(u16),
    /// A signed 16-bit integer.
    I16(i16),
    /// An unsigned 32-bit integer.
    U32(u32),
    /// A signed 32-bit integer.
    I32(i32),
    /// A 32-bit IEEE float.
    F32(f32),
    /// A bool.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values of one type.
    Array(MetaArray),
    /// An unsigned 64-bit integer.
    U64(u64),
    /// A signed 64-bit integer.
    I64(i64),
    /// A 64-bit IEEE float.
    F64(f64),
}

impl MetaValue {
    /// The value's type.
    pub fn meta_type(&self) -> MetaType {
        match self {
            MetaValue::U8(_) => MetaType::U8,
            MetaValue::I8(_) => MetaType::I8,
            MetaValue::U16(_) => MetaType::U16,
            MetaValue::I16(_) => MetaType::I16,
            MetaValue::U32(_) => MetaType::U32,
            MetaValue::I32(_) => MetaType::I32,
            MetaValue::F32(_) => MetaType::F32,
            MetaValue::Bool(_) => MetaType::Bool,
            MetaValue::String(_) => MetaType::String,
            MetaValue::Array(_) => MetaType::Array,
            MetaValue::U64(_) => MetaType::U64,
            MetaValue::I64(_) => MetaType::I64,
            MetaValue::F64(_) => MetaType::F64,
        }
    }

    /// Any integer value, widened to i128 (`None` for non-integers).
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer value that fits in u32.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_integer().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer value that fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_integer().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer value that fits in i32.
    pub fn as_i32(&self) -> Option<i32> {
        self.as_integer().and_then(|v| i32::try_from(v).ok())
    }

    /// Any integer value that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_integer().and_then(|v| i64::try_from(v).ok())
    }

    /// An `F32` value, or an `F64` narrowed to f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// An `F64` value, or an `F32` widened.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A `Bool` value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A `String` value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An `Array` value.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for MetaValue {
            fn from(v: $t) -> Self { MetaValue::$v(v) }
        }
    )*};
}
value_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, MetaArray => Array, u64 => U64, i64 => I64, f64 => F64);

impl From<&str> for MetaValue {
    fn from(v: &str) -> Self {
        MetaValue::String(v.to_owned())
    }
}

/// Many strings stored compactly: one concatenated buffer plus end offsets (a 262k-token
/// vocabulary costs its text plus 8 bytes per token, not a `String` allocation per token).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StringArray {
    data: String,
    ends: Vec<usize>,
}

impl StringArray {
    /// An empty array.
    pub fn new() -> StringArray {
        StringArray::default()
    }

    /// An empty array with room for `n` strings.
    pub fn with_capacity(n: usize) -> StringArray {
        StringArray {
            data: String::new(),
            ends: Vec::with_capacity(n),
        }
    }

    /// Append a string.
    pub fn push(&mut self, s: &str) {
        self.data.push_str(s);
        self.ends.push(self.data.len());
    }

    /// Number of strings.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// No strings.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The `i`-th string.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { *self.ends.get(i - 1)? };
        self.data.get(start..end)
    }

    /// All strings in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(move |i| self.get(i).unwrap_or(""))
    }

    /// All strings, collected.
    pub fn to_vec(&self) -> Vec<&str> {
        self.iter().collect()
    }
}

impl std::fmt::Debug for StringArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for StringArray {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut a = StringArray::new();
        for s in iter {
            a.push(s.as_ref());
        }
        a
    }
}

/// A metadata array: one typed vector per element type. Arrays of arrays nest as
/// `Array(Vec<MetaArray>)`, each inner array with its own element type.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    /// Elements of type u8.
    U8(Vec<u8>),
    /// Elements of type i8.
    I8(Vec<i8>),
    /// Elements of type u16.
    U16(Vec<u16>),
    /// Elements of type i16.
    I16(Vec<i16>),
    /// Elements of type u32.
    U32(Vec<u32>),
    /// Elements of type i32.
    I32(Vec<i32>),
    /// Elements of type f32.
    F32(Vec<f32>),
    /// Elements of type bool.
    Bool(Vec<bool>),
    /// Strings, stored compactly.
    String(StringArray),
    /// Nested arrays, each with its own element type.
    Array(Vec<MetaArray>),
    /// Elements of type u64.
    U64(Vec<u64>),
    /// Elements of type i64.
    I64(Vec<i64>),
    /// Elements of type f64.
    F64(Vec<f64>),
}

impl MetaArray {
    /// The element type.
    pub fn element_type(&self) -> MetaType {
        match self {
            MetaArray::U8(_) => MetaType::U8,
            MetaArray::I8(_) => MetaType::I8,
            MetaArray::U16(_) => MetaType::U16,
            MetaArray::I16(_) => MetaType::I16,
            MetaArray::U32(_) => MetaType::U32,
            MetaArray::I32(_) => MetaType::I32,
            MetaArray::F32(_) => MetaType::F32,
            MetaArray::Bool(_) => MetaType::Bool,
            MetaArray::String(_) => MetaType::String,
            MetaArray::Array(_) => MetaType::Array,
            MetaArray::U64(_) => MetaType::U64,
            MetaArray::I64(_) => MetaType::I64,
            MetaArray::F64(_) => MetaType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    /// No elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`-th element as an owned value (strings and nested arrays are cloned).
    pub fn get(&self, i: usize) -> Option<MetaValue> {
        Some(match self {
            MetaArray::U8(v) => MetaValue::U8(*v.get(i)?),
            MetaArray::I8(v) => MetaValue::I8(*v.get(i)?),
            MetaArray::U16(v) => MetaValue::U16(*v.get(i)?),
            MetaArray::I16(v) => MetaValue::I16(*v.get(i)?),
            MetaArray::U32(v) => MetaValue::U32(*v.get(i)?),
            MetaArray::I32(v) => MetaValue::I32(*v.get(i)?),
            MetaArray::F32(v) => MetaValue::F32(*v.get(i)?),
            MetaArray::Bool(v) => MetaValue::Bool(*v.get(i)?),
            MetaArray::String(v) => MetaValue::String(v.get(i)?.to_owned()),
            MetaArray::Array(v) => MetaValue::Array(v.get(i)?.clone()),
            MetaArray::U64(v) => MetaValue::U64(*v.get(i)?),
            MetaArray::I64(v) => MetaValue::I64(*v.get(i)?),
            MetaArray::F64(v) => MetaValue::F64(*v.get(i)?),
        })
    }

    /// The strings of a string array.
    pub fn as_strings(&self) -> Option<&StringArray> {
        match self {
            MetaArray::String(s) => Some(s),
            _ => None,
        }
    }

    /// An integer array converted element-wise to i128 (`None` for other element types).
    fn integers(&self) -> Option<Vec<i128>> {
        Some(match self {
            MetaArray::U8(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I8(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::U16(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I16(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::U32(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I32(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::U64(v) => v.iter().map(|&x| x.into()).collect(),
            MetaArray::I64(v) => v.iter().map(|&x| x.into()).collect(),
            _ => return None,
        })
    }

    /// An integer array whose every element fits in i32.
    pub fn to_i32_vec(&self) -> Option<Vec<i32>> {
        if let MetaArray::I32(v) = self {
            return Some(v.clone());
        }
        self.integers()?
            .into_iter()
            .map(|x| i32::try_from(x).ok())
            .collect()
    }

    /// An integer array whose every element fits in u32.
    pub fn to_u32_vec(&self) -> Option<Vec<u32>> {
        if let MetaArray::U32(v) = self {
            return Some(v.clone());
        }
        self.integers()?
            .into_iter()
            .map(|x| u32::try_from(x).ok())
            .collect()
    }

    /// An array of f32 (f64 narrowed, integers converted) as f32.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        match self {
            MetaArray::F32(v) => Some(v.clone()),
            MetaArray::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            other => Some(other.integers()?.into_iter().map(|x| x as f32).collect()),
        }
    }
}

macro_rules! array_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<Vec<$t>> for MetaArray {
            fn from(v: Vec<$t>) -> Self { MetaArray::$v(v) }
        }
        impl From<Vec<$t>> for MetaValue {
            fn from(v: Vec<$t>) -> Self { MetaValue::Array(MetaArray::$v(v)) }
        }
    )*};
}
array_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, MetaArray => Array, u64 => U64, i64 => I64, f64 => F64);

impl From<StringArray> for MetaArray {
    fn from(v: StringArray) -> Self {
        MetaArray::String(v)
    }
}

impl From<Vec<String>> for MetaArray {
    fn from(v: Vec<String>) -> Self {
        MetaArray::String(v.into_iter().collect())
    }
}

impl From<Vec<&str>> for MetaArray {
    fn from(v: Vec<&str>) -> Self {
        MetaArray::String(v.into_iter().collect())
    }
}
