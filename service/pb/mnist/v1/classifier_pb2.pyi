from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_UINT8: _ClassVar[Encoding]
    ENCODING_FLOAT32_LE: _ClassVar[Encoding]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_LOADING: _ClassVar[VersionState]
    VERSION_STATE_AVAILABLE: _ClassVar[VersionState]
    VERSION_STATE_FAILED: _ClassVar[VersionState]
    VERSION_STATE_UNLOADED: _ClassVar[VersionState]
    VERSION_STATE_REJECTED: _ClassVar[VersionState]
ENCODING_UNSPECIFIED: Encoding
ENCODING_UINT8: Encoding
ENCODING_FLOAT32_LE: Encoding
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_LOADING: VersionState
VERSION_STATE_AVAILABLE: VersionState
VERSION_STATE_FAILED: VersionState
VERSION_STATE_UNLOADED: VersionState
VERSION_STATE_REJECTED: VersionState

class ClassifyRequest(_message.Message):
    __slots__ = ("pixels", "encoding", "image_count", "model", "version", "version_label", "request_id", "packed_output", "images", "routing_key")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_LABEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PACKED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ROUTING_KEY_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    encoding: Encoding
    image_count: int
    model: str
    version: int
    version_label: str
    request_id: str
    packed_output: bool
    images: _containers.RepeatedScalarFieldContainer[bytes]
    routing_key: str
    def __init__(self, pixels: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., image_count: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., version_label: _Optional[str] = ..., request_id: _Optional[str] = ..., packed_output: _Optional[bool] = ..., images: _Optional[_Iterable[bytes]] = ..., routing_key: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "probabilities")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    label: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, label: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("predictions", "model", "version", "request_id", "labels", "probabilities_f32le")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_F32LE_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model: str
    version: int
    request_id: str
    labels: _containers.RepeatedScalarFieldContainer[int]
    probabilities_f32le: bytes
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ..., labels: _Optional[_Iterable[int]] = ..., probabilities_f32le: _Optional[bytes] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message", "request_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    request_id: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: ClassifyResponse
    error: StreamError
    def __init__(self, response: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "state", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: VersionState
    reason: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("shape", "encodings", "float_min", "float_max", "max_images_per_request")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    FLOAT_MIN_FIELD_NUMBER: _ClassVar[int]
    FLOAT_MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    encodings: _containers.RepeatedScalarFieldContainer[Encoding]
    float_min: float
    float_max: float
    max_images_per_request: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., encodings: _Optional[_Iterable[_Union[Encoding, str]]] = ..., float_min: _Optional[float] = ..., float_max: _Optional[float] = ..., max_images_per_request: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "current_version", "versions", "labels", "input", "class_labels", "training_metrics", "layer_sizes", "created_at", "metadata_json", "current_pinned", "canary_version", "canary_percent", "shadow_version")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class TrainingMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_METRICS_FIELD_NUMBER: _ClassVar[int]
    LAYER_SIZES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PINNED_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    current_version: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    labels: _containers.ScalarMap[str, int]
    input: InputSpec
    class_labels: _containers.RepeatedScalarFieldContainer[str]
    training_metrics: _containers.ScalarMap[str, float]
    layer_sizes: _containers.RepeatedScalarFieldContainer[int]
    created_at: str
    metadata_json: str
    current_pinned: bool
    canary_version: int
    canary_percent: float
    shadow_version: int
    def __init__(self, name: _Optional[str] = ..., current_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ..., labels: _Optional[_Mapping[str, int]] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., class_labels: _Optional[_Iterable[str]] = ..., training_metrics: _Optional[_Mapping[str, float]] = ..., layer_sizes: _Optional[_Iterable[int]] = ..., created_at: _Optional[str] = ..., metadata_json: _Optional[str] = ..., current_pinned: _Optional[bool] = ..., canary_version: _Optional[int] = ..., canary_percent: _Optional[float] = ..., shadow_version: _Optional[int] = ...) -> None: ...
