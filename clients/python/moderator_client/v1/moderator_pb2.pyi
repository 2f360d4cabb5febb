from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Detail(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DETAIL_UNSPECIFIED: _ClassVar[Detail]
    DETAIL_ALL_POLICIES: _ClassVar[Detail]
    DETAIL_VIOLATIONS: _ClassVar[Detail]
    DETAIL_DECISION: _ClassVar[Detail]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOW: _ClassVar[Decision]
    DECISION_REVIEW: _ClassVar[Decision]
    DECISION_BLOCK: _ClassVar[Decision]
    DECISION_ERROR: _ClassVar[Decision]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_REVIEW: _ClassVar[Action]
    ACTION_BLOCK: _ClassVar[Action]

class PolicyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_MODE_UNSPECIFIED: _ClassVar[PolicyMode]
    POLICY_MODE_ENFORCE: _ClassVar[PolicyMode]
    POLICY_MODE_SHADOW: _ClassVar[PolicyMode]

class ImageErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_ERROR_CODE_UNSPECIFIED: _ClassVar[ImageErrorCode]
    IMAGE_ERROR_CODE_EMPTY: _ClassVar[ImageErrorCode]
    IMAGE_ERROR_CODE_TOO_MANY_BYTES: _ClassVar[ImageErrorCode]
    IMAGE_ERROR_CODE_TOO_MANY_PIXELS: _ClassVar[ImageErrorCode]
    IMAGE_ERROR_CODE_UNSUPPORTED_FORMAT: _ClassVar[ImageErrorCode]
    IMAGE_ERROR_CODE_CORRUPT: _ClassVar[ImageErrorCode]
    IMAGE_ERROR_CODE_INVALID_EMBEDDING: _ClassVar[ImageErrorCode]
    IMAGE_ERROR_CODE_TOO_COMPLEX: _ClassVar[ImageErrorCode]
DETAIL_UNSPECIFIED: Detail
DETAIL_ALL_POLICIES: Detail
DETAIL_VIOLATIONS: Detail
DETAIL_DECISION: Detail
DECISION_UNSPECIFIED: Decision
DECISION_ALLOW: Decision
DECISION_REVIEW: Decision
DECISION_BLOCK: Decision
DECISION_ERROR: Decision
ACTION_UNSPECIFIED: Action
ACTION_REVIEW: Action
ACTION_BLOCK: Action
POLICY_MODE_UNSPECIFIED: PolicyMode
POLICY_MODE_ENFORCE: PolicyMode
POLICY_MODE_SHADOW: PolicyMode
IMAGE_ERROR_CODE_UNSPECIFIED: ImageErrorCode
IMAGE_ERROR_CODE_EMPTY: ImageErrorCode
IMAGE_ERROR_CODE_TOO_MANY_BYTES: ImageErrorCode
IMAGE_ERROR_CODE_TOO_MANY_PIXELS: ImageErrorCode
IMAGE_ERROR_CODE_UNSUPPORTED_FORMAT: ImageErrorCode
IMAGE_ERROR_CODE_CORRUPT: ImageErrorCode
IMAGE_ERROR_CODE_INVALID_EMBEDDING: ImageErrorCode
IMAGE_ERROR_CODE_TOO_COMPLEX: ImageErrorCode

class Image(_message.Message):
    __slots__ = ("id", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: bytes
    def __init__(self, id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModerateRequest(_message.Message):
    __slots__ = ("images", "policy_ids", "include_embeddings", "request_id", "detail")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    policy_ids: _containers.RepeatedScalarFieldContainer[str]
    include_embeddings: bool
    request_id: str
    detail: Detail
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., policy_ids: _Optional[_Iterable[str]] = ..., include_embeddings: _Optional[bool] = ..., request_id: _Optional[str] = ..., detail: _Optional[_Union[Detail, str]] = ...) -> None: ...

class ModerateResponse(_message.Message):
    __slots__ = ("results", "policy_version", "model", "precision", "request_id", "error")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ImageResult]
    policy_version: str
    model: str
    precision: str
    request_id: str
    error: RequestError
    def __init__(self, results: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ..., policy_version: _Optional[str] = ..., model: _Optional[str] = ..., precision: _Optional[str] = ..., request_id: _Optional[str] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("id", "decision", "policies", "error", "embedding", "views", "sha256", "pdq", "pdq_quality")
    ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PDQ_FIELD_NUMBER: _ClassVar[int]
    PDQ_QUALITY_FIELD_NUMBER: _ClassVar[int]
    id: str
    decision: Decision
    policies: _containers.RepeatedCompositeFieldContainer[PolicyResult]
    error: ImageError
    embedding: _containers.RepeatedScalarFieldContainer[float]
    views: _containers.RepeatedCompositeFieldContainer[Embedding]
    sha256: str
    pdq: str
    pdq_quality: int
    def __init__(self, id: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., policies: _Optional[_Iterable[_Union[PolicyResult, _Mapping]]] = ..., error: _Optional[_Union[ImageError, _Mapping]] = ..., embedding: _Optional[_Iterable[float]] = ..., views: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., sha256: _Optional[str] = ..., pdq: _Optional[str] = ..., pdq_quality: _Optional[int] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class PolicyResult(_message.Message):
    __slots__ = ("policy_id", "score", "threshold", "violated", "action", "mode", "matched_description", "policy_version", "example_score", "example_threshold", "matched_example", "allowed_by", "matched_hash")
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VIOLATED_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_SCORE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MATCHED_EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_BY_FIELD_NUMBER: _ClassVar[int]
    MATCHED_HASH_FIELD_NUMBER: _ClassVar[int]
    policy_id: str
    score: float
    threshold: float
    violated: bool
    action: Action
    mode: PolicyMode
    matched_description: str
    policy_version: str
    example_score: float
    example_threshold: float
    matched_example: str
    allowed_by: str
    matched_hash: str
    def __init__(self, policy_id: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., violated: _Optional[bool] = ..., action: _Optional[_Union[Action, str]] = ..., mode: _Optional[_Union[PolicyMode, str]] = ..., matched_description: _Optional[str] = ..., policy_version: _Optional[str] = ..., example_score: _Optional[float] = ..., example_threshold: _Optional[float] = ..., matched_example: _Optional[str] = ..., allowed_by: _Optional[str] = ..., matched_hash: _Optional[str] = ...) -> None: ...

class ImageError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ImageErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ImageErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies", "policy_version", "last_reload")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyInfo]
    policy_version: str
    last_reload: ReloadStatus
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyInfo, _Mapping]]] = ..., policy_version: _Optional[str] = ..., last_reload: _Optional[_Union[ReloadStatus, _Mapping]] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("id", "title", "action", "mode", "threshold", "description_count", "version", "benign_count", "example_count", "allow_example_count", "hash_count")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BENIGN_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    HASH_COUNT_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    action: Action
    mode: PolicyMode
    threshold: float
    description_count: int
    version: str
    benign_count: int
    example_count: int
    allow_example_count: int
    hash_count: int
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., mode: _Optional[_Union[PolicyMode, str]] = ..., threshold: _Optional[float] = ..., description_count: _Optional[int] = ..., version: _Optional[str] = ..., benign_count: _Optional[int] = ..., example_count: _Optional[int] = ..., allow_example_count: _Optional[int] = ..., hash_count: _Optional[int] = ...) -> None: ...

class ReloadPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadPoliciesResponse(_message.Message):
    __slots__ = ("status", "policy_version")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    status: ReloadStatus
    policy_version: str
    def __init__(self, status: _Optional[_Union[ReloadStatus, _Mapping]] = ..., policy_version: _Optional[str] = ...) -> None: ...

class ReloadStatus(_message.Message):
    __slots__ = ("ok", "message", "unix_time")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    unix_time: int
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ..., unix_time: _Optional[int] = ...) -> None: ...

class EmbeddedImage(_message.Message):
    __slots__ = ("id", "embedding", "views", "sha256", "pdq", "pdq_quality")
    ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PDQ_FIELD_NUMBER: _ClassVar[int]
    PDQ_QUALITY_FIELD_NUMBER: _ClassVar[int]
    id: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    views: _containers.RepeatedCompositeFieldContainer[Embedding]
    sha256: str
    pdq: str
    pdq_quality: int
    def __init__(self, id: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., views: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., sha256: _Optional[str] = ..., pdq: _Optional[str] = ..., pdq_quality: _Optional[int] = ...) -> None: ...

class ScoreEmbeddingsRequest(_message.Message):
    __slots__ = ("images", "policy_ids", "model", "detail")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[EmbeddedImage]
    policy_ids: _containers.RepeatedScalarFieldContainer[str]
    model: str
    detail: Detail
    def __init__(self, images: _Optional[_Iterable[_Union[EmbeddedImage, _Mapping]]] = ..., policy_ids: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., detail: _Optional[_Union[Detail, str]] = ...) -> None: ...
