from service.pb.mnist.v1 import classifier_pb2 as _classifier_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdminPromoteVersionRequest(_message.Message):
    __slots__ = ("model", "version", "force")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    force: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., force: _Optional[bool] = ...) -> None: ...

class AdminSetCanaryRequest(_message.Message):
    __slots__ = ("model", "version", "percent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    percent: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., percent: _Optional[float] = ...) -> None: ...

class AdminSetShadowRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class AdminListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdminListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[AdminModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[AdminModelStatus, _Mapping]]] = ...) -> None: ...

class AdminLoadVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class AdminUnloadVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class AdminSetCurrentVersionRequest(_message.Message):
    __slots__ = ("model", "version", "hold")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    hold: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., hold: _Optional[bool] = ...) -> None: ...

class AdminSetLabelRequest(_message.Message):
    __slots__ = ("model", "label", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    label: str
    version: int
    def __init__(self, model: _Optional[str] = ..., label: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class AdminRescanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdminVersionStatus(_message.Message):
    __slots__ = ("version", "state", "reason", "detail", "labels")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: _classifier_pb2.VersionState
    reason: str
    detail: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[_classifier_pb2.VersionState, str]] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminModelStatus(_message.Message):
    __slots__ = ("name", "current_version", "current_pinned", "policy", "versions", "labels", "canary_version", "canary_percent", "shadow_version", "rollout_note")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PINNED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    current_version: int
    current_pinned: bool
    policy: str
    versions: _containers.RepeatedCompositeFieldContainer[AdminVersionStatus]
    labels: _containers.ScalarMap[str, int]
    canary_version: int
    canary_percent: float
    shadow_version: int
    rollout_note: str
    def __init__(self, name: _Optional[str] = ..., current_version: _Optional[int] = ..., current_pinned: _Optional[bool] = ..., policy: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[AdminVersionStatus, _Mapping]]] = ..., labels: _Optional[_Mapping[str, int]] = ..., canary_version: _Optional[int] = ..., canary_percent: _Optional[float] = ..., shadow_version: _Optional[int] = ..., rollout_note: _Optional[str] = ...) -> None: ...
