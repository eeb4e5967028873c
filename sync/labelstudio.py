"""A self-hosted Label Studio server as a review backend (plain HTTP, see ``labelstudio_client``).

Project: one labelling config with head and person boxes (``RectangleLabels`` ``box``), the
key points (``KeyPointLabels`` ``kp``, one label per schema name) and a per-point visibility
(``Choices`` ``visibility``, ``perRegion``), as measured in ``shared/LABEL_STUDIO.md``.

Tasks: an image under the server's local-files document root (a local-files storage is
registered for its folder), ``data`` with the image id and provenance (the bundle id too), and
one prediction (``model_version`` = the project's, ``score`` = judge score) whose regions are in
percent of the image. Region ids carry the grouping: ``h<i>`` a head, ``p<i>`` person i's box, ``p<i>k<j>``
its point j; the visibility ``choices`` item shares its key point's id. Outside points are
not placed (they claim no location); a reviewer adds a point that is in view.

The task links an image the reviewer's browser can show, in the record's frame. A stored JPEG
is linked as it is: a browser decodes it and turns an EXIF-turned one upright itself (CSS
``image-orientation: from-image``), as the record's coordinates are. Any other stored image
goes through ``sync.reencode.prepare_upload``, Ground Truth's upload step: a PNG, BMP or WebP it
leaves unchanged is linked as it is; what it re-encodes (a 16-bit TIFF, a PGM, a JPEG 2000, an
image stored turned) is linked as that JPEG, upright and of the record's size, written once
to ``copy_dir/<project id>/`` under the document root before the import. Linking the stored
file of such an image gave the reviewer an empty page to label.

A copy lives as long as a task may still be shown for review, and no longer (they were kept for
ever before: one JPEG per image ever sent). Each collection (``collect``, also the agent's first
pass after a start) removes, in ``copy_dir``:

- the copy of a task whose review the merge has put into the dataset since the collection
  before (``merged``, which the agent's merge task calls with its report): a review our checks
  or the merge refuse, or a skipped task, keeps its copy, since the reviewer still works on it.
  A reviewer who opens such a finished task again sees no image; the review stays merged;
- in the current project's folder, a copy that no task of the project links (its task deleted,
  or a run killed between the write and the import); in the folder of a project the server
  no longer has (deleted), every copy, and the folder;
- the temporary file of a write a kill cut short (in the current project's folder).

A folder whose project the server still has (an old ``project_title``'s) keeps the copies its
tasks show. A copy removed while its image still waits for review (a deleted task or project)
is written again when the image is submitted again. A kill at any point leaves at worst a file
that the next collection removes; the reviews themselves are in Label Studio, never in a copy.
Several appliances may share one project, and so one ``copy_dir`` (under the server's one
document root): a box writes a batch's copies first and then imports them, and another box's
collection in between found copies no task linked yet and removed them (measured: each of 400
PGM frames a second box imported linked a removed copy; the reviewers were shown no image, for
good). So a copy or temporary file that no task links goes at once only when it is of an image
this appliance's store holds (``holds``, which the agent gives from its store); another
appliance's goes once it is ``FOREIGN_COPY_AGE_S`` old (a box that left the team, or one killed
before its import). Without ``holds`` every copy is taken for this process's (one appliance
per project). Two processes of one appliance on one project import twice (one agent per store).

The project is found by title (created when missing) and its id kept, but a 404 on a project
request means it was deleted: the id is forgotten, the project looked up (or created) again and
the request repeated once. The tasks that were in the deleted project are gone with it;
``missing`` tells the submit task (``sync.submit``) which pending images have no task in the
current project, so that it submits them again (a deleted task, a new ``project_title``, too).
Label Studio deletes a project's (or a task's) annotations at once, with it: a review finished
there but not yet collected is lost and its image is reviewed again in the new project. A
review already collected was merged (the image is ``reviewed``) and is not submitted again.
An annotation deleted in Label Studio after the merge took its review is said, once (by the
process that merged it: a deletion while the agent was stopped is not seen); the dataset keeps
the review (a deletion is no review), and the task, without annotations now, is to do in Label
Studio again: a review submitted there replaces the kept one.

Collecting: the full JSON export of every task (``download_all_tasks``: the tasks still to do
tell which copies are shown) is polled (the webhook only wakes the collector early); the
latest submitted, not cancelled annotation of each task is validated and converted back to
pixels. A key point without a visibility choice is ``visible``.

Whose point (``_group``), in this order: a relation the reviewer drew (Alt+R in the editor;
either way round) or a ``parentID`` between the point and a person box puts it in that person,
also a prediction's point (a correction of the model's grouping); a ``p<i>k<j>`` id, person i
while its box ``p<i>`` is there; a relation or ``parentID`` to a point of a person, that person.
The points left of a person whose box was deleted (or relabelled ``head``) go together into
the new person box that holds more than half of them (deleted and drawn again), else the
review is refused: deleting a box in the editor leaves its points, which went to the neighbour
(or refused the review as the neighbour's "two 'nose' points"). A new point (an id the editor
made up) with no link joins, of the persons that have no point of its name, the one whose box
holds it, else the nearest box within ``NEAR_BOX`` of that box's larger side. With no person
box at all, the new points make one person. Anything else (a point in the boxes of two persons
that both lack it, far from every box, linked to two persons, a person's name twice) refuses
the review with what to do in the editor: a guess merged a seat neighbour's wrist into the
wrong person, and a relation refused the whole review. Other relations (between boxes, to a
head) mean nothing here.

An annotation whose regions were drawn on an image of another size than the task's (their
``original_width`` and ``original_height``: the image the browser showed, e.g. a JPEG whose
EXIF orientation the browser read otherwise than OpenCV) is refused: its percentages are of
another frame.

A refused review is said to the reviewer in the task itself (``_set_note``): the reason, and
that pressing Update after the fix merges it, goes into the task's ``data["review_note"]``,
which the labelling config's ``Header`` shows above the image (and the Data Manager as a
column to filter on). Label Studio Community has no comments API; a task's ``meta`` is shown
nowhere in the editor; a prediction's text would need a control whose region the reviewer
submits back. The note is written when the export shows another one (once per refusal, also
across restarts) and removed (the key with it) once the merge takes a review of the task, or
when the task holds no submitted annotation any more. Every refusal after the collection is
noted: our checks' (``InvalidAnnotation``), an annotation of another shape (on a task of ours),
and the merge's own (``LabelStudioBackend.merged``: a head box of no area, two tasks of the
image whose reviews differ); a refusal by the merge was only logged, so the reviewer never knew.
The first note makes the project's Data Manager tab "Refused reviews" (the tasks with a note):
the label stream never serves a task to the reviewer who annotated it again, so that tab is
where a reviewer who submitted and moved on finds what to fix (``_ensure_views``).

A box turned in the editor (``rotation``) by more than ``ROTATION_JITTER`` degrees is refused
with what to do; the labelling config hides the rotation handle (``canRotate="false"``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import quote, unquote
from xml.sax.saxutils import quoteattr

from service.durable import fsync_dir, write_bytes_atomic
from service.errors import ImageError
from service.keypoints import CABIN19_NAMES, OUTSIDE, VISIBLE
from service.outputs import image_suffix
from service.record import VISIBILITIES
from service.store import is_image_id

from .errors import PermanentError, RetryableError
from .labelstudio_client import AuthError, LabelStudioClient, NotFound
from .reencode import prepare_upload
from .review import Box, ReviewedKeypoint, ReviewedLabel, ReviewedPerson, ReviewItem, labels_differ

log = logging.getLogger(__name__)

BACKEND = "labelstudio"
IMAGE, BOX, KP, VIS = "img", "box", "kp", "visibility"
HEAD, PERSON = "head", "person"
POINT_SIZE = 0.6  # marker size, percent of the image width
MODEL_VERSION = "edge-annotator"  # every prediction's model_version in a project made here (see ``task``)
COPY_DIR = "label-studio-jpeg"  # default copy_dir, under the document root
_COPY_NAME = re.compile(r"^[0-9A-Za-z_-]{1,128}$")
COLLECT_RETRY_BASE, COLLECT_RETRY_CAP = 60.0, 600.0  # seconds between exports after a failed one
NOTE = "review_note"  # the task data key that the labelling config's Header shows
NOTE_STYLE = "color: #b3261e; white-space: pre-wrap"
NOTE_MAX = 2000  # characters of a refusal reason put into the note
REFUSED_VIEW = "Refused reviews"  # the Data Manager tab of the tasks with a note (``_ensure_views``)
FOREIGN_COPY_AGE_S = 86400.0  # an unlinked copy of another appliance's image goes this old (module doc)
_ID_START = re.compile(r"^[0-9a-f]{8,64}$")  # an image id, or the start a temporary file's name keeps
_KP_ID, _PERSON_ID = re.compile(r"^p(\d+)k(\d+)$"), re.compile(r"^p(\d+)$")
T = TypeVar("T")


class AccessRefused(RetryableError):
    """The server refused the API token (HTTP 401/403: revoked, rotated, the user deactivated):
    retryable here, not a ``PermanentError``, so that a review server's token never stops the
    sync agent (and its uploads, in a systemd restart loop that ends in a dead unit): the
    review tasks wait and try again with a backoff (``sync.submit``, the merge task's
    ``collect_interval``), each try saying which setting to fix, and go on by themselves once
    the server takes the token again."""


class ConfigEdited(RetryableError):
    """The project's labelling config was edited in Label Studio and annotations use the edit:
    the server refuses ours back (see ``LabelStudioBackend._put_config``)."""


class InvalidAnnotation(PermanentError):
    """An annotation that our checks refuse (unknown label, coordinates off the image, ...)."""


def label_config(names: Sequence[str] = CABIN19_NAMES) -> str:
    """The project's labelling config (XML) for these key-point names.

    Its ``Header`` shows the task's ``data["review_note"]`` above the image (why the review
    was not merged, ``LabelStudioBackend._set_note``): a Header has no name, so it is neither
    a control (no region, nothing in the annotation) nor an object tag (Label Studio requires
    no such key in the tasks: those without one, imported before, show an empty line).

    ``canRotate="false"`` hides the rotation handle of a selected box (the editor's
    ``KonvaRegion.canRotate``, Label Studio 1.23): the dataset's boxes are upright, and a
    reviewer who turned a person box by a slip had the whole review refused. The editor's
    3-point rectangle tool still draws turned boxes: ``parse_result`` refuses those with what
    to do (``_upright``)."""
    labels = "".join(f"<Label value={quoteattr(n)}/>" for n in names)
    choices = "".join(f'<Choice value="{v}"/>' for v in VISIBILITIES)
    return (f'<View>\n  <Header value="${NOTE}" size="5" style="{NOTE_STYLE}"/>\n'
            f'  <Image name="{IMAGE}" value="$image" zoom="true"/>\n'
            f'  <RectangleLabels name="{BOX}" toName="{IMAGE}" canRotate="false">'
            f'<Label value="{HEAD}"/><Label value="{PERSON}"/>'
            f'</RectangleLabels>\n'
            f'  <KeyPointLabels name="{KP}" toName="{IMAGE}">{labels}</KeyPointLabels>\n'
            f'  <View visibleWhen="region-selected" whenTagName="{KP}">\n'
            f'    <Choices name="{VIS}" toName="{IMAGE}" perRegion="true" choice="single" showInline="true">'
            f'{choices}</Choices>\n  </View>\n</View>')


def _rect(rid: str, label: str, box: Sequence[float], w: int, h: int) -> dict[str, Any]:
    x1, y1, x2, y2 = box
    return {"id": rid, "from_name": BOX, "to_name": IMAGE, "type": "rectanglelabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": 100 * x1 / w, "y": 100 * y1 / h, "width": 100 * (x2 - x1) / w,
                      "height": 100 * (y2 - y1) / h, "rotation": 0, "rectanglelabels": [label]}}


def prediction_result(record: Mapping[str, Any], names: Sequence[str] = CABIN19_NAMES) -> list[dict[str, Any]]:
    """Label Studio result items (percent) for a pre-annotation record (pixels).

    Points are matched by name (``record["keypoint_names"]``, else ``names`` order); names the
    project does not know and ``outside`` points are left out.
    """
    w, h = int(record["width"]), int(record["height"])
    rec_names = list(record.get("keypoint_names") or names)
    index = {n: j for j, n in enumerate(names)}
    out = [_rect(f"h{i}", HEAD, hd["box"], w, h) for i, hd in enumerate(record.get("heads", []))]
    for i, p in enumerate(record.get("persons", [])):
        out.append(_rect(f"p{i}", PERSON, p["box"], w, h))
        for name, k in zip(rec_names, p["keypoints"]):
            if name not in index or k["visibility"] == OUTSIDE:
                continue
            rid = f"p{i}k{index[name]}"
            where = {"x": 100 * float(k["x"]) / w, "y": 100 * float(k["y"]) / h, "width": POINT_SIZE}
            common = {"id": rid, "to_name": IMAGE, "original_width": w, "original_height": h, "image_rotation": 0}
            out.append({**common, "from_name": KP, "type": "keypointlabels", "value": {**where, "keypointlabels": [name]}})
            out.append({**common, "from_name": VIS, "type": "choices", "value": {**where, "choices": [k["visibility"]]}})
    return out


def _single(value: Mapping[str, Any], key: str, allowed: Sequence[str], rid: str) -> str:
    got = value.get(key)
    if not isinstance(got, list) or len(got) != 1 or got[0] not in allowed:
        raise InvalidAnnotation(f"region {rid}: expected one of {list(allowed)} in {key}, got {got!r}")
    return str(got[0])


def _percent(value: Mapping[str, Any], keys: Sequence[str], rid: str) -> list[float]:
    nums = []
    for k in keys:
        v = value.get(k)
        try:  # float() of an integer too large for a float raises OverflowError (was out of collect)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and -0.01 <= float(v) <= 100.01
        except OverflowError:
            ok = False
        if not ok:
            shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
            raise InvalidAnnotation(f"region {rid}: expected {k} in 0..100 (percent), got {shown}")
        nums.append(float(v))  # type: ignore[arg-type]
    return nums


def parse_result(result: Sequence[Mapping[str, Any]], width: int, height: int,
                 names: Sequence[str] = CABIN19_NAMES) -> tuple[tuple[Box, ...], tuple[ReviewedPerson, ...]]:
    """Heads and persons (pixels, points in ``names`` order) of an annotation's or prediction's
    result; raises ``InvalidAnnotation`` on anything our labelling config cannot produce."""
    heads: list[Box] = []
    boxes: dict[str, Box] = {}
    points: dict[str, tuple[str, float, float]] = {}
    states: dict[str, str] = {}
    links: dict[str, set[str]] = {}  # region id -> the regions a relation or a parentID ties it to
    for item in result:
        rid, kind, value = str(item.get("id", "")), item.get("type"), item.get("value") or {}
        if kind == "relation":  # drawn in the editor (Alt+R): {from_id, to_id, direction}, no id nor names
            ends = [str(item.get(k) or "") for k in ("from_id", "to_id")]
            if all(ends) and ends[0] != ends[1]:
                links.setdefault(ends[0], set()).add(ends[1])
                links.setdefault(ends[1], set()).add(ends[0])
            continue
        parent = item.get("parentID")
        if isinstance(parent, str) and parent and parent != rid:
            links.setdefault(rid, set()).add(parent)
            links.setdefault(parent, set()).add(rid)
        if item.get("to_name") != IMAGE:
            raise InvalidAnnotation(f"region {rid}: expected to_name {IMAGE!r}, got {item.get('to_name')!r}")
        turned = item.get("image_rotation") or 0
        if not isinstance(turned, (int, float)) or abs(float(turned)) % 360 > 1e-6:
            # drawn on the image turned in the editor (an Image with rotateControl): the
            # percentages are of the turned frame, not the image's
            raise InvalidAnnotation(f"region {rid}: drawn on the image turned by {turned!r} degrees; "
                                    "turn it back and submit again")
        if kind == "rectanglelabels" and item.get("from_name") == BOX:
            x, y, bw, bh = _percent(value, ("x", "y", "width", "height"), rid)
            _upright(value.get("rotation"), rid)
            if x + bw > 100.01 or y + bh > 100.01:
                raise InvalidAnnotation(f"region {rid}: the box reaches past the image's edge (x {x:.2f} + width "
                                        f"{bw:.2f}, y {y:.2f} + height {bh:.2f} percent); move it inside the image")
            box = (x * width / 100, y * height / 100, (x + bw) * width / 100, (y + bh) * height / 100)
            if _single(value, "rectanglelabels", (HEAD, PERSON), rid) == HEAD:
                heads.append(box)
            else:
                boxes[rid] = box
        elif kind == "keypointlabels" and item.get("from_name") == KP:
            x, y = _percent(value, ("x", "y"), rid)
            points[rid] = (_single(value, "keypointlabels", names, rid), x * width / 100, y * height / 100)
        elif kind == "choices" and item.get("from_name") == VIS:
            states[rid] = _single(value, "choices", VISIBILITIES, rid)
        else:
            raise InvalidAnnotation(f"region {rid}: unexpected {kind!r} from {item.get('from_name')!r}")
    for rid in set(states) - set(points):
        log.warning("visibility choice on region %s, which is not a key point: ignored", rid)
    return tuple(heads), _group(boxes, points, states, names, links)


ROTATION_JITTER = 0.5  # degrees: a box turned less than this either way is taken as drawn upright


def _upright(rotation: Any, rid: str) -> None:
    """Refuse a box turned in the editor (``value.rotation``, degrees, which the editor keeps in
    0..360: a slip of -0.2 is 359.8) by more than ``ROTATION_JITTER``, saying what to do there.

    Under it the box is taken as drawn: its x, y, width and height are those of the upright box,
    whose far corner moves by under 1 % of the box's diagonal. A turned box has no upright
    equivalent (its enclosing box holds more than the person): any rotation, 359.8 too, refused
    the whole review with the region's value as the only reason."""
    shown = repr(rotation) if len(repr(rotation)) <= 40 else repr(rotation)[:37] + "..."
    try:
        angle = float(rotation or 0) if not isinstance(rotation, (bool, str)) else math.nan
    except (TypeError, ValueError, OverflowError):
        angle = math.nan
    if not math.isfinite(angle):
        raise InvalidAnnotation(f"region {rid}: expected the box's rotation in degrees, got {shown}")
    angle %= 360.0
    if min(angle, 360.0 - angle) > ROTATION_JITTER:
        signed = angle - 360.0 if angle > 180.0 else angle  # the editor's 358 is a turn of -2
        raise InvalidAnnotation(f"region {rid}: the box is rotated by {signed:.1f} degrees, boxes must be unrotated: "
                                "set its angle to 0 in the region's details, or delete it and draw it again with "
                                "the rectangle tool (not the 3-point one)")


def _group(boxes: Mapping[str, Box], points: Mapping[str, tuple[str, float, float]],
           states: Mapping[str, str], names: Sequence[str],
           links: Mapping[str, set[str]] | None = None) -> tuple[ReviewedPerson, ...]:
    """Key points -> persons (module docstring, "Whose point"); ``links`` are the relations and
    ``parentID`` values of the result. A point no rule gives one person raises ``InvalidAnnotation``
    saying what to do in the editor: a guess put a seat neighbour's wrist on the wrong person."""
    links = links or {}
    person_box: dict[str, Box] = dict(boxes)
    members: dict[str, dict[str, tuple[str, ReviewedKeypoint]]] = {rid: {} for rid in person_box}
    owner_of: dict[str, str] = {}

    def add(owner: str, rid: str, name: str, kp: ReviewedKeypoint) -> None:
        if name in members[owner]:
            other = members[owner][name][0]
            raise InvalidAnnotation(f"person {owner}: two {name!r} points ({_where(other, kp_of[other])} and "
                                    f"{_where(rid, kp)}); delete one or link it to its own person")
        members[owner][name] = (rid, kp)
        owner_of[rid] = owner

    kp_of = {rid: ReviewedKeypoint(x, y, states.get(rid, VISIBLE)) for rid, (_, x, y) in points.items()}
    loose, bereft = [], {}
    for rid, (name, _, _) in sorted(points.items()):
        kp = kp_of[rid]
        to_box = sorted(r for r in links.get(rid, ()) if r in person_box)
        if len(to_box) > 1:
            raise InvalidAnnotation(f"key point {name!r} {_where(rid, kp)} is linked to {len(to_box)} person boxes "
                                    f"({', '.join(to_box)}); keep the link to its own person only")
        m = _KP_ID.match(rid)
        if to_box:  # a relation (or parentID) the reviewer drew wins over the id
            add(to_box[0], rid, name, kp)
        elif m and f"p{m.group(1)}" in person_box:
            add(f"p{m.group(1)}", rid, name, kp)
        elif m:  # its person's box was deleted (or relabelled head)
            bereft.setdefault(f"p{m.group(1)}", []).append((rid, name, kp))
        else:
            loose.append((rid, name, kp))
    # A point linked to another point joins that point's person.
    for group in [loose, *bereft.values()]:
        for entry in list(group):
            rid, name, kp = entry
            via = sorted({owner_of[r] for r in links.get(rid, ()) if r in owner_of})
            if len(via) > 1:
                raise InvalidAnnotation(f"key point {name!r} {_where(rid, kp)} is linked to points of {len(via)} "
                                        f"persons ({', '.join(via)}); keep the link to its own person only")
            if via:
                add(via[0], rid, name, kp)
                group.remove(entry)
    # The points left of a person whose box is gone go together into the new box that holds more
    # than half of them (the box deleted and drawn again), else they are refused: the reviewer
    # who deletes a person's box alone leaves its points, which went to a neighbour.
    drawn = [r for r in person_box if not _PERSON_ID.match(r)]
    for pid, group in sorted(bereft.items()):
        if not group:
            continue
        held = {r: sum(_inside(person_box[r], kp) for _, _, kp in group) for r in drawn}
        best = max(held, key=lambda r: held[r], default=None)
        if best is None or 2 * held[best] <= len(group) or list(held.values()).count(held[best]) > 1:
            group.sort(key=lambda e: int(_KP_ID.match(e[0]).group(2)))  # type: ignore[union-attr]
            listed = ", ".join(repr(name) for _, name, _ in group[:4]) + (", ..." if len(group) > 4 else "")
            raise InvalidAnnotation(f"person {pid}'s box was deleted (or relabelled) but {len(group)} of its key "
                                    f"points remain ({listed}): delete them too to remove the person, or draw its "
                                    "box again")
        for rid, name, kp in group:
            add(best, rid, name, kp)
    if loose and not person_box:  # no person boxes at all: one person, the extent of the points
        person_box["p-new"] = (min(k.x for _, _, k in loose), min(k.y for _, _, k in loose),
                               max(k.x for _, _, k in loose), max(k.y for _, _, k in loose))
        members["p-new"] = {}
        for rid, name, kp in loose:
            add("p-new", rid, name, kp)
        loose = []
    # New points by geometry, in rounds: a point two free boxes hold is placed once the other
    # boxes' points took their places (in the order of the editor's random ids, the same review
    # was merged or refused); what no round places is refused with its own reason.
    while loose:
        left = []
        for rid, name, kp in loose:
            try:
                owner = _geometric_owner(person_box, members, rid, name, kp)
            except InvalidAnnotation:
                left.append((rid, name, kp))
                continue
            add(owner, rid, name, kp)
        if len(left) == len(loose):
            rid, name, kp = left[0]
            _geometric_owner(person_box, members, rid, name, kp)  # raises its reason
        loose = left

    def order(rid: str) -> tuple[int, str]:
        m = _PERSON_ID.match(rid)
        return (int(m.group(1)), "") if m else (1 << 30, rid)

    return tuple(ReviewedPerson(person_box[rid], tuple(members[rid][n][1] if n in members[rid]
                                                      else ReviewedKeypoint(0.0, 0.0, OUTSIDE) for n in names))
                 for rid in sorted(person_box, key=order))


NEAR_BOX = 0.25  # how far outside a person's box (of its larger side) an unlinked new point may join it


def _geometric_owner(person_box: Mapping[str, Box], members: Mapping[str, Mapping[str, Any]], rid: str, name: str,
                     kp: ReviewedKeypoint) -> str:
    """The person an unlinked new point joins: of the persons without a ``name`` point, the one
    whose box holds it, else the one whose box is nearest, within ``NEAR_BOX``; anything else
    (two such boxes hold it, none is near, or those that hold it have that point already) is
    ``InvalidAnnotation``: a reviewer who adds a point must be understood, not guessed."""
    link = "link it to its person (a relation to the person's box or one of its points)"
    holding = [r for r in person_box if _inside(person_box[r], kp)]
    free = [r for r in holding if name not in members[r]]
    if len(free) == 1:
        return free[0]
    if len(free) > 1:
        raise InvalidAnnotation(f"new key point {name!r} {_where(rid, kp)} lies in the boxes of {len(free)} persons "
                                f"({', '.join(sorted(free))}) that have none: {link}")
    if holding:
        raise InvalidAnnotation(f"new key point {name!r} {_where(rid, kp)}: the person whose box holds it "
                                f"({', '.join(sorted(holding))}) has one already: delete one, or draw the box of "
                                f"the person it belongs to, or {link}")
    near = [(_box_distance(b, kp), r) for r, b in person_box.items()
            if name not in members[r] and _box_distance(b, kp) <= NEAR_BOX * max(b[2] - b[0], b[3] - b[1])]
    if not near:
        raise InvalidAnnotation(f"new key point {name!r} {_where(rid, kp)} lies in no person's box nor near one "
                                f"that lacks it: draw the box of the person it belongs to, or {link}")
    return min(near)[1]


def _inside(box: Box, kp: ReviewedKeypoint) -> bool:
    return box[0] <= kp.x <= box[2] and box[1] <= kp.y <= box[3]


def _box_distance(box: Box, kp: ReviewedKeypoint) -> float:
    return math.hypot(max(box[0] - kp.x, 0.0, kp.x - box[2]), max(box[1] - kp.y, 0.0, kp.y - box[3]))


def _where(rid: str, kp: ReviewedKeypoint) -> str:
    """A point as the reviewer can find it: where it is (pixels) and its region id."""
    return f"at ({kp.x:.0f}, {kp.y:.0f}) px, region {rid}"


def seen_sizes(result: Sequence[Mapping[str, Any]]) -> set[tuple[int, int]]:
    """The image sizes (width, height) that a result's regions were drawn on: Label Studio
    stores the size of the image the browser showed with each region (``original_width``,
    ``original_height``); items without them name none."""
    sizes = set()
    for item in result:
        w, h = item.get("original_width"), item.get("original_height")
        if isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0:
            sizes.add((round(w), round(h)))
    return sizes


def _copy_file(name: str) -> bool:
    """Whether a file name in ``copy_dir`` is ours: a copy (``<name>.jpg``) or the temporary
    file of one (``.<name>.<random>.tmp``, ``service.durable``)."""
    return bool((name.endswith(".jpg") and _COPY_NAME.match(name[:-4]))
                or (name.startswith(".") and name.endswith(".tmp")))


def _note_text(reason: str) -> str:
    """The note a reviewer reads in the task for a refused review: why, and what to do there."""
    if len(reason) > NOTE_MAX:
        reason = reason[:NOTE_MAX - 3] + "..."
    return (f"Not merged into the dataset: {reason}. Fix this in the annotation and press Update; "
            "this note goes once the review is merged.")


def _result_key(annotation: Mapping[str, Any]) -> list[Any]:
    """What an annotation says, for comparing two (its regions, by id, without their order)."""
    result = annotation.get("result") or []
    return sorted((repr(item.get("id")), repr(item.get("type")), repr(item.get("value"))) for item in result
                  if isinstance(item, Mapping))


def _epoch(text: str | None) -> float:
    if not text:
        return 0.0
    return _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


class LabelStudioBackend:
    """``ReviewBackend`` on a Label Studio server; see the module docstring.

    ``document_root`` is the server's ``LOCAL_FILES_DOCUMENT_ROOT``: every image to review
    must lie under it (``ReviewItem.local_path``). ``copy_dir`` (default ``<document_root>/
    label-studio-jpeg``, also under it) holds the JPEGs shown instead of stored images a
    browser cannot show, one folder per project, removed when no longer needed (module
    docstring). ``webhook_url``, when given, is registered for annotation events (e.g. a
    ``WebhookReceiver``'s url). ``holds(id or the id's start)``: whether this appliance's store
    has the image; with several appliances on one project only its own unlinked copies go at once.
    """

    name = BACKEND

    def __init__(self, client: LabelStudioClient, project_title: str, document_root: Path | str,
                 names: Sequence[str] = CABIN19_NAMES, webhook_url: str | None = None,
                 import_chunk: int = 200, copy_dir: Path | str | None = None,
                 holds: Callable[[str], bool] | None = None) -> None:
        if len(project_title) < 3:
            raise ValueError(f"Label Studio project title: expected at least 3 characters, got {project_title!r}")
        self.client, self.title = client, project_title
        self.document_root = Path(document_root).resolve()
        self.copy_dir = (self.document_root / COPY_DIR if copy_dir is None else Path(copy_dir)).resolve()
        if not self.copy_dir.is_relative_to(self.document_root):
            raise ValueError(f"Label Studio copy_dir: expected a folder under the document root "
                             f"{self.document_root} (the server serves only from there), got {self.copy_dir}")
        self.names, self.webhook_url, self.import_chunk = tuple(names), webhook_url, import_chunk
        self.holds = holds  # whether this appliance's store has an image (id or its start): module doc
        self.project_id: int | None = None
        self.model_version: str | None = None  # the project's, which every prediction must carry
        self.rejected: dict[str, str] = {}
        self.conflicts: dict[str, str] = {}  # image id -> the disagreeing annotations of its task (said once)
        self.skipped: dict[str, list[str]] = {}  # image id -> who skipped its task (nothing submitted)
        self._users: dict[int, str] = {}
        self._merged: set[str] = set()  # image ids whose review the merge took since the last sweep
        # image ids of the project's tasks whose review the merge took (``collect`` says it when
        # the task's annotations are deleted afterwards); only the tasks of the last export
        self._in_dataset: set[str] = set()
        # image ids whose task links a copy that is not there (the last task listing): written again
        self._unshown: set[str] = set()
        # image id -> its tasks (of the last export) whose reviews went to the merge: the merge's
        # report (``merged``) writes their note when it refuses the review, clears it when it takes it
        self._collected: dict[str, list[Mapping[str, Any]]] = {}
        self._views_in: int | None = None  # the project whose "Refused reviews" tab is there (``_ensure_views``)
        self._notes_failed = False  # a note's write failed in this collection: the rest wait for the next
        self.clock = time.monotonic
        self._collect_failures, self._collect_retry_at, self._collect_error = 0, 0.0, ""

    @property
    def job(self) -> str:
        return f"{self.client.base_url}/projects/{self.project_id}"

    def ensure_project(self) -> int:
        """Create the project, or bring an existing one's labelling config up to date; its id.

        Of several projects with the title, the server's first (pinned, else the newest: what
        every earlier release took, so that an upgrade keeps a box on the project whose tasks it
        has), with a warning naming the others, whose reviews are not collected. Appliances that
        share a ``project_title`` and start at once (a roll-out, a power cut ending) each found no
        project and each made one: 3 boxes started together made 3 or 4 projects of one title,
        each box imported into its own. So a box that made one looks again, and when an older one
        of the title is there it deletes its own (new and empty: nothing was imported into it)
        and takes the oldest, which every box of the race agrees on."""
        if self.project_id is not None:
            return self.project_id
        config = label_config(self.names)
        found = self._titled()
        if found:
            project = found[0]
            if len(found) > 1:
                log.warning("Label Studio projects %s are all titled %r; using %s (the server lists it first): the "
                            "reviews in the others are not collected (move their tasks there, or delete them)",
                            ", ".join(str(p["id"]) for p in found), self.title, project["id"])
            self._put_config(project, "updated the labelling config of project %s")
        else:
            project = self.client.post("/api/projects/", {"title": self.title, "label_config": config})
            log.info("created Label Studio project %s (%r)", project["id"], self.title)
            older = sorted((p for p in self._titled() if int(p["id"]) < int(project["id"])), key=lambda p: int(p["id"]))
            if older:
                try:
                    self.client.delete(f"/api/projects/{project['id']}/")
                except NotFound:
                    pass
                log.info("Label Studio project %s (%r) was made at the same time by another appliance; deleted "
                         "the one made here, %s, and use %s", older[0]["id"], self.title, project["id"], older[0]["id"])
                project = older[0]
                self._put_config(project, "updated the labelling config of project %s")
        self.model_version = str(project.get("model_version") or "") or None
        self.project_id = int(project["id"])
        if self.webhook_url:
            hooks = self.client.get("/api/webhooks/", project=self.project_id) or []
            if not any(h.get("url") == self.webhook_url for h in hooks):
                self.client.post("/api/webhooks/", {
                    "project": self.project_id, "url": self.webhook_url, "send_payload": True,
                    "send_for_all_actions": False, "actions": ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]})
        return self.project_id

    def _titled(self) -> list[Mapping[str, Any]]:
        """The projects titled ``self.title``, in the server's order (pinned, then newest first)."""
        return [p for p in self.client.pages("/api/projects/", "results", title=self.title)
                if isinstance(p, Mapping) and p.get("title") == self.title]

    def _put_config(self, project: Mapping[str, Any], said: str, level: int = logging.INFO) -> None:
        """Give ``project`` our labelling config when it has another one (``said`` logged).

        Label Studio refuses it (HTTP 400) once annotations use what an admin edited there (a
        renamed control, a removed label): a ``ConfigEdited``, retryable, so that the review
        tasks wait and say it, and the uploads and model pulls go on (was a ``PermanentError``
        that ended ``annotator sync``)."""
        config = label_config(self.names)
        if str(project.get("label_config", "")).strip() == config:
            return
        try:
            self.client.patch(f"/api/projects/{project['id']}/", {"label_config": config})
        except (NotFound, AuthError):
            raise
        except PermanentError as exc:
            raise ConfigEdited(
                f"the labelling config of Label Studio project {project['id']} ({self.title!r}) was edited there and "
                f"annotations use the edit, so the server refuses ours back ({exc}); restore the config in the "
                "project's settings (or delete those annotations): the review tasks wait, the uploads go on") from exc
        log.log(level, said, project["id"])

    def _in_project(self, step: Callable[[int], T]) -> T:
        """``step(project id)``; when it meets a 404 because the project was deleted, the project
        is looked up (or created) again and ``step`` runs once more in it.

        Without this the id was kept for the life of the process: every request after a deletion
        got a 404, a ``PermanentError`` that ended ``annotator sync``. A refused token
        (``AuthError``) is an ``AccessRefused``, retryable (see there)."""
        try:
            pid = self.ensure_project()
            try:
                return step(pid)
            except NotFound:
                if not self._project_gone(pid):
                    raise
            log.warning("Label Studio project %s (%r) is gone; looking it up again", pid, self.title)
            self.project_id = None
            return step(self.ensure_project())
        except AuthError as exc:
            raise AccessRefused(f"{exc}; the review tasks wait and try again, the uploads go on") from exc

    def _check_config(self, pid: int) -> None:
        """At each collection: the labelling config an admin edited while the agent runs is put
        back, or said (``ConfigEdited``); it was checked at the start only, and reviews drawn with
        the edit were refused one by one as "unexpected" regions."""
        self._put_config(self.client.get(f"/api/projects/{pid}/"),
                         "the labelling config of Label Studio project %s was edited there; put ours back "
                         "(the reviews need its names)", logging.WARNING)

    def _project_gone(self, pid: int) -> bool:
        try:
            self.client.get(f"/api/projects/{pid}/")
        except NotFound:
            return True
        return False

    def _image_ids(self, pid: int) -> set[str]:
        """The image ids that have a task in project ``pid`` (every page of the task list).

        An image with more than one task was imported twice: a retry after an import that the
        server still carried out although its answer never came (a timeout, a proxy's 502 while
        the server worked on). The extra tasks that nobody has touched (no annotation, cancelled
        or not, no draft) are deleted, the oldest task kept, so that the image is reviewed once.
        The images whose task links a copy that is not there go to ``_unshown`` (``missing``)."""
        tasks: dict[str, list[Mapping[str, Any]]] = {}
        self._unshown = set()
        for t in self.client.pages("/api/tasks/", "tasks", project=pid):
            image_id = str((t.get("data") or {}).get("image_id"))
            tasks.setdefault(image_id, []).append(t)
            copy = self._linked(t)
            if copy is not None and copy == self._copy_path(pid, image_id) and not copy.exists():
                self._unshown.add(image_id)
        for image_id, group in tasks.items():
            if len(group) > 1 and is_image_id(image_id):  # not tasks a person imported by hand (no image id)
                self._drop_duplicates(pid, image_id, group)
        return set(tasks)

    def _drop_duplicates(self, pid: int, image_id: str, group: Sequence[Mapping[str, Any]]) -> None:
        def untouched(t: Mapping[str, Any]) -> bool:
            return not (t.get("total_annotations") or t.get("cancelled_annotations") or t.get("drafts")
                        or t.get("annotations_ids"))

        keep = min(group, key=lambda t: (untouched(t), int(t.get("id") or 0)))
        # The task list carries no other reviewer's drafts: each one's own list is asked (a
        # draft saved on a duplicate is a reviewer's work, kept).
        extra = [t for t in group if t is not keep and untouched(t) and not self._has_drafts(t)]
        for t in extra:
            try:
                self.client.delete(f"/api/tasks/{t['id']}/")
            except NotFound:  # deleted meanwhile
                pass
        if extra:
            log.warning("image %s had %d tasks in project %s (an import repeated after its answer was lost); "
                        "deleted the %d untouched extra ones, kept task %s", image_id[:12], len(group), pid,
                        len(extra), keep.get("id"))

    def _has_drafts(self, task: Mapping[str, Any]) -> bool:
        try:
            return bool(self.client.get(f"/api/tasks/{task['id']}/drafts"))
        except NotFound:  # the task was deleted meanwhile
            return False

    def missing(self, image_ids: Iterable[str]) -> set[str]:
        """Which of these images have no task in the current project (deleted tasks, a deleted or
        recreated project, another ``project_title``), or a task whose copy is not there (removed
        by another appliance's collection before this version, or by hand: the reviewers were
        shown no image, for good): the submit task sends them again, and ``_import`` writes
        the copy again where the task links it."""
        wanted = {str(i) for i in image_ids}
        if not wanted:
            return set()
        present = self._in_project(self._image_ids)
        return (wanted - present) | (wanted & self._unshown)

    def _stored(self, item: ReviewItem) -> Path:
        """The item's stored file, which must lie under the document root."""
        if item.local_path is None:
            raise ValueError(f"Label Studio needs a local file for {item.image_id}; got only {item.image_uri}")
        path = Path(item.local_path).resolve()
        if not path.is_relative_to(self.document_root):
            raise ValueError(f"{path} is not under the Label Studio document root {self.document_root}")
        return path

    def _copy_path(self, pid: int, image_id: str) -> Path:
        """Where the browser-safe JPEG of ``image_id`` for project ``pid`` goes: its name is the
        id (a store id, 64 hex digits), or the id's sha256 when the id is no plain file name."""
        name = image_id if _COPY_NAME.match(image_id) else hashlib.sha256(image_id.encode()).hexdigest()
        return self.copy_dir / str(pid) / f"{name}.jpg"

    def shown(self, item: ReviewItem, pid: int) -> Path:
        """The file the reviewer's browser gets for ``item`` in project ``pid``: the stored file,
        or the JPEG that ``prepare_upload`` makes of it, written to ``copy_dir/<pid>`` when
        missing (module docstring).

        The copy is written whole (temporary file, fsync, rename, folders fsynced) and kept
        until a collection finds it no longer needed: a run killed between the write and the
        import finds it and imports the task once, and a task never names a copy that a power
        loss took back. An image that cannot be prepared, or whose file is missing (the uploader
        fails such images before they get here), is linked as stored, with a warning, as before
        there were copies."""
        path = self._stored(item)
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except FileNotFoundError:
            log.warning("image %s: the stored file %s is missing; linking it anyway", item.image_id[:12], path)
            return path
        if image_suffix(head) == ".jpg":
            return path  # any JPEG: the browser decodes it and applies its EXIF orientation itself
        copy = self._copy_path(pid, item.image_id)
        if copy.exists():  # an earlier run's: the same bytes (the store's files never change)
            return copy
        data = path.read_bytes()
        try:
            prepared = prepare_upload(data, item.record)
        except (ImageError, ValueError, KeyError) as exc:
            log.warning("image %s: no browser-safe copy for Label Studio (%s); linking the stored file",
                        item.image_id[:12], exc)
            return path
        if prepared.data == data:  # a PNG, BMP or WebP a browser shows as it is
            return path
        new_folders = [f for f in (self.copy_dir, copy.parent) if not f.exists()]
        write_bytes_atomic(copy, prepared.data, sync_dir=True)
        for folder in new_folders:
            fsync_dir(folder.parent)
        log.info("image %s: shown to Label Studio as a %dx%d JPEG (stored as %s)", item.image_id[:12],
                 item.width, item.height, image_suffix(data))
        return copy

    def _ensure_storages(self, pid: int, folders: set[Path]) -> None:
        known = {Path(s["path"]) for s in self.client.get("/api/storages/localfiles/", project=pid) or []}
        for folder in sorted(folders - known):
            self.client.post("/api/storages/localfiles/", {"project": pid, "path": str(folder),
                                                           "use_blob_urls": True, "title": folder.name})
            log.info("registered local storage %s for project %s", folder, pid)

    def task(self, batch_id: str, item: ReviewItem, pid: int) -> dict[str, Any]:
        """The task (data + prediction) imported for one item into project ``pid``; its image is
        ``shown(item, pid)``."""
        relative = self.shown(item, pid).relative_to(self.document_root).as_posix()
        # quoted: a store path with "+", "&", "#" or "%" in it broke the link (Label Studio quotes it too)
        data = {"image": f"/data/local-files/?d={quote(relative, safe='/')}", "image_id": item.image_id,
                "width": item.width, "height": item.height, "batch": batch_id, "bundle_id": item.bundle_id,
                "score": item.score, "reasons": list(item.reasons), "audit": item.audit}
        # The project's model_version, not the bundle's (that is in data["bundle_id"]): Label
        # Studio sets the project's from the first import and its label stream shows only the
        # predictions of that version; a new bundle's tasks opened with an empty image.
        prediction: dict[str, Any] = {"model_version": self.model_version or MODEL_VERSION,
                                      "result": prediction_result(item.record, self.names)}
        if item.score is not None:
            prediction["score"] = float(item.score)
        return {"data": data, "predictions": [prediction]}

    def submit(self, batch_id: str, items: Sequence[ReviewItem]) -> None:
        """Import the items not yet in the project as tasks with their predictions."""
        if not items:
            return
        for item in items:  # a path outside the document root is refused before any request
            self._stored(item)
        self._in_project(lambda pid: self._import(pid, batch_id, items))

    def _import(self, pid: int, batch_id: str, items: Sequence[ReviewItem]) -> None:
        present = self._image_ids(pid)
        again = [item.image_id for item in items if item.image_id in present and item.image_id in self._unshown
                 and self.shown(item, pid) == self._copy_path(pid, item.image_id)]  # written again (``missing``)
        if again:
            log.warning("%d tasks in project %s linked a copy that was not there (the reviewers saw no image; first "
                        "image %s); written again", len(again), pid, again[0][:12])
        fresh = {item.image_id: item for item in items if item.image_id not in present}
        if not fresh:
            return
        new = [self.task(batch_id, item, pid) for item in fresh.values()]  # copies written before the import
        self._ensure_storages(pid, {(self.document_root / unquote(t["data"]["image"].split("?d=", 1)[1])).parent
                                    for t in new})
        for start in range(0, len(new), self.import_chunk):
            chunk = new[start:start + self.import_chunk]
            answer = self.client.post(f"/api/projects/{pid}/import", chunk)
            made = answer.get("task_count") if isinstance(answer, Mapping) else None
            if isinstance(made, int) and made < len(chunk):
                # Not the batch's fault and not for the reconcile 10 minutes later: the batch is not
                # marked submitted, and the next pass imports what has no task (the list says).
                raise RetryableError(f"Label Studio POST {self.client.base_url}/api/projects/{pid}/import: {made} tasks made of "
                                     f"{len(chunk)} sent (batch {batch_id}); the rest is imported at the next pass")
        log.info("imported %d tasks into project %s (batch %s)", len(new), pid, batch_id)

    def _reviewer(self, completed_by: Any) -> str | None:
        if isinstance(completed_by, Mapping):
            return str(completed_by.get("email") or completed_by.get("id"))
        if completed_by is None:
            return None
        uid = int(completed_by)
        if uid not in self._users:
            try:
                self._users[uid] = str(self.client.get(f"/api/users/{uid}/").get("email") or uid)
            except PermanentError:
                self._users[uid] = str(uid)
        return self._users[uid]

    def label(self, task: Mapping[str, Any]) -> ReviewedLabel | None:
        """The ReviewedLabel of one exported task (None when nothing was submitted)."""
        annotations = [a for a in task.get("annotations", []) if isinstance(a, Mapping)]
        done = [a for a in annotations if not a.get("was_cancelled")]
        image_id = str((task.get("data") or {}).get("image_id"))
        if not done:
            self.conflicts.pop(image_id, None)
            skips = sorted(str(self._reviewer(a.get("completed_by"))) for a in annotations)
            if skips and self.skipped.get(image_id) != skips:  # said once per new skip
                log.info("image %s (task %s): skipped in Label Studio by %s; it waits for another reviewer",
                         image_id[:12], task.get("id"), ", ".join(skips))
            if skips:
                self.skipped[image_id] = skips
            else:
                self.skipped.pop(image_id, None)
            return None
        self.skipped.pop(image_id, None)
        # One rule for several annotations of a task (several annotators, or one submitting
        # twice): the one marked ground truth in Label Studio (a manager's pick), else the latest.
        marked = [a for a in done if a.get("ground_truth")]
        ann = max(marked or done, key=lambda a: (a.get("updated_at") or "", a.get("id", 0)))
        data = task["data"]
        width, height = int(data["width"]), int(data["height"])
        self._note_conflict(task, ann, done, bool(marked))
        other = sorted(seen_sizes(ann.get("result", [])) - {(width, height)})
        if other:
            raise InvalidAnnotation(f"the regions were drawn on a {other[0][0]}x{other[0][1]} image, the task's is "
                                    f"{width}x{height} (shown turned or scaled?): not the image's coordinates")
        heads, persons = parse_result(ann.get("result", []), width, height, self.names)
        # The export names the annotation's parent prediction in full under "prediction"
        # (the task's "predictions" are only ids there).
        ref = ann.get("prediction") if isinstance(ann.get("prediction"), Mapping) else None
        if ref is None:
            ref = next((p for p in task.get("predictions", []) if isinstance(p, Mapping)), None)
        adjusted = None
        if ref is not None:
            ref_heads, ref_persons = parse_result(ref.get("result", []), width, height, self.names)
            adjusted = labels_differ(heads, persons, ref_heads, ref_persons, tolerance_px=0.5)
        return ReviewedLabel(str(data["image_id"]), width, height, heads, persons, BACKEND, self.job,
                             _epoch(ann.get("updated_at") or ann.get("created_at")),
                             self._reviewer(ann.get("completed_by")), adjusted, self.names)

    def _note_conflict(self, task: Mapping[str, Any], ann: Mapping[str, Any], done: Sequence[Mapping[str, Any]],
                       marked: bool) -> None:
        """Say once (a warning, kept in ``conflicts``) when a task's other submitted annotations
        disagree with the one taken and none is marked ground truth."""
        image_id = str(task["data"].get("image_id"))
        others = [a for a in done if a is not ann and _result_key(a) != _result_key(ann)]
        if marked or not others:
            self.conflicts.pop(image_id, None)
            return
        who = [f"{a.get('id')} by {self._reviewer(a.get('completed_by'))} at {a.get('updated_at')}"
               for a in [ann, *others]]
        note = (f"task {task.get('id')} has {len(others) + 1} annotations that differ ({'; '.join(who)}): "
                f"the latest is taken, annotation {who[0]}; mark one as ground truth in Label Studio to choose another")
        if self.conflicts.get(image_id) != note:
            log.warning("image %s: %s", image_id[:12], note)
        self.conflicts[image_id] = note

    def collect(self) -> Iterator[ReviewedLabel]:
        """Every submitted review in the project (from the JSON export); refused ones in
        ``rejected``. Then the copies no longer needed are removed (module docstring).

        After a failed export (``RetryableError``: the server down, hanging until the client's
        timeout, a proxy's page, a refused token) the server is not asked again for
        ``COLLECT_RETRY_BASE`` seconds, doubling to ``COLLECT_RETRY_CAP``: a call meanwhile
        raises the same error again without a request, so that a hanging server does not hold
        the agent's other tasks for its timeout at every collection."""
        if self.clock() < self._collect_retry_at:
            raise RetryableError(f"{self._collect_error} (not asked again for "
                                 f"{self._collect_retry_at - self.clock():.0f} s)")
        try:
            def export_of(pid: int) -> tuple[int, list[Any]]:
                self._check_config(pid)
                return pid, self.client.get(f"/api/projects/{pid}/export", exportType="JSON",
                                            download_all_tasks="true") or []
            pid, export = self._in_project(export_of)
        except RetryableError as exc:
            self._collect_failures += 1
            delay = min(COLLECT_RETRY_CAP, COLLECT_RETRY_BASE * 2.0 ** min(self._collect_failures - 1, 62))
            self._collect_retry_at, self._collect_error = self.clock() + delay, str(exc)
            raise
        self._collect_failures, self._collect_retry_at = 0, 0.0
        labels = []
        self._collected.clear()
        self._notes_failed = False
        self._in_dataset &= {str((t.get("data") or {}).get("image_id")) for t in export if isinstance(t, Mapping)}
        for task in export:
            image_id = str(task.get("data", {}).get("image_id"))
            try:
                label = self.label(task)
            except (InvalidAnnotation, ValueError, KeyError, TypeError, AttributeError, IndexError,
                    ArithmeticError) as exc:  # a value of another shape: this task refused, not the collection
                if self.rejected.get(image_id) != str(exc):
                    log.warning("review of %s (task %s) refused: %s", image_id, task.get("id"), exc)
                self.rejected[image_id] = str(exc)
                if is_image_id(image_id):  # not a task a person imported by hand
                    self._set_note(task, _note_text(str(exc) if isinstance(exc, InvalidAnnotation) else
                                                     f"the task could not be read ({type(exc).__name__}: {exc})"))
                continue
            if label is not None:
                self._collected.setdefault(image_id, []).append(task)  # the merge's report notes it
                self.rejected.pop(image_id, None)
                labels.append(label)
            elif (task.get("data") or {}).get(NOTE):
                self._set_note(task, None)  # nothing submitted now (the refused review deleted)
            elif image_id in self._in_dataset:
                self._in_dataset.discard(image_id)  # said once
                log.warning("image %s (task %s): its review was deleted in Label Studio after the merge took it; "
                            "the dataset keeps that review (a review submitted in the task again replaces it)",
                            image_id[:12], task.get("id"))
        try:
            self._sweep(pid, export, self._merged)
            self._merged.clear()
        except Exception:  # the copies wait for the next collection; the reviews must not
            log.exception("Label Studio copies: the sweep failed; collecting goes on")
        yield from labels

    def merged(self, report: Any) -> None:
        """The merge task's report (``sync.merge.MergeReport``): the copies of the images whose
        reviews went into the dataset (merged, or the same again) go at the next collection, and
        so do their tasks' notes; a review the merge refuses (``report.refused``: a head box of
        no area, two tasks of the image whose reviews differ, ...) gets its note in each of the
        image's tasks, as a refusal of ours does (it was only logged: the reviewer never knew)."""
        self._merged.update(report.merged, report.unchanged)
        self._in_dataset.update(report.merged, report.unchanged)
        for image_id in [*report.merged, *report.unchanged]:
            for task in self._collected.pop(image_id, ()):
                self._set_note(task, None)
        for image_id, why in getattr(report, "refused", {}).items():
            for task in self._collected.get(image_id, ()):
                self._set_note(task, _note_text(why))

    def _set_note(self, task: Mapping[str, Any], note: str | None) -> None:
        """Show ``note`` (None: none) in the task in Label Studio: its ``data["review_note"]``,
        which the labelling config's Header shows above the image. The reviewer saw nothing of a
        refusal (only the agent's log said it), so the image could wait for ever.

        Written only when the exported task shows another note (once per refusal, also across
        restarts: the export says what is there); a note is removed with its key, so the task's
        data is again as imported. ``PATCH /api/tasks/<id>/`` replaces the whole ``data``, so the
        exported data goes back with it. A failure is logged and tried again at the next
        collection (the export still shows the old note); reviews and collecting go on."""
        data = dict(task.get("data") or {})
        if (data.get(NOTE) or None) == note or not isinstance(task.get("id"), int) or self._notes_failed:
            return
        data.pop(NOTE, None)
        if note is not None:
            data[NOTE] = note
        if note is not None and self.project_id is not None and self._views_in != self.project_id:
            try:
                self._ensure_views(self.project_id)
            except RetryableError as exc:  # down or hanging: this collection's one failed write
                self._notes_failed = True
                log.warning("Label Studio project %s: the %r tab was not made; it and the review notes are tried "
                            "again at the next collection: %s", self.project_id, REFUSED_VIEW, exc)
                return
            except PermanentError as exc:  # refused: the notes go on without the tab
                self._views_in = self.project_id
                log.warning("Label Studio project %s: the %r tab was not made (%s); the review notes are written "
                            "without it", self.project_id, REFUSED_VIEW, exc)
        try:
            self.client.patch(f"/api/tasks/{task['id']}/", {"data": data})
        except NotFound:  # the task was deleted meanwhile
            return
        except (PermanentError, RetryableError) as exc:
            # The others wait for the next collection too: a server that answers reads but hangs
            # on writes held the merge task for a timeout per refused task, at every pass.
            self._notes_failed = True
            log.warning("task %s: its review note was not %s in Label Studio; the notes are tried again at the "
                        "next collection: %s", task["id"], "written" if note else "removed", exc)
            return
        log.info("task %s (image %s): review note %s", task["id"], str(data.get("image_id"))[:12],
                 "written in Label Studio" if note else "removed in Label Studio")

    def _ensure_views(self, pid: int) -> None:
        """Give project ``pid``'s Data Manager a "Refused reviews" tab (a saved view, shared by
        the organization's users): the tasks whose ``review_note`` is not empty, where a reviewer
        finds the reviews to fix. Made at the first note (a write, counted with the notes'), once
        per process; an admin's edit of the tab is kept, a deleted one comes back after a restart.

        Label Studio 1.23 Community has no other way back to a reviewer: its label stream never
        serves a task the user annotated again (``projects/functions/next_task.py``; whatever
        its ``is_labeled`` or ``overlap``), and its requeue is for skipped tasks only. The editor
        opens the first tab and makes a "Default" one only when the project has none: a project
        without tabs gets that first, else every reviewer's label stream would show the refused
        tasks only (the stream takes the selected tab's filter: ``data_manager.functions.get_prepare_params``)."""
        views = self.client.get("/api/dm/views/", project=pid) or []
        titles = [str((v.get("data") or {}).get("title")) for v in views if isinstance(v, Mapping)]
        if not titles:
            self.client.post("/api/dm/views/", {"project": pid, "data": {"title": "Default"}})
        if REFUSED_VIEW not in titles:
            made = self.client.post("/api/dm/views/", {"project": pid, "data": {"title": REFUSED_VIEW, "filters": {
                "conjunction": "and", "items": [{"filter": f"filter:tasks:data.{NOTE}", "operator": "empty",
                                                 "type": "String", "value": False}]}}})
            # Last, by hand: Label Studio orders a new tab by the project's count of tabs, so after
            # tabs were deleted it sorted before the remaining ones (orders 1 and 2) and became the
            # first tab, whose filter every reviewer's label stream then took (review of the change).
            ids = [v["id"] for v in sorted((v for v in views if isinstance(v, Mapping) and "id" in v),
                                           key=lambda v: (v.get("order") or 0, v["id"]))]
            if ids and isinstance(made, Mapping) and "id" in made:
                self.client.post("/api/dm/views/order/", {"project": pid, "ids": [*ids, made["id"]]})
            log.info("Label Studio project %s: Data Manager tab %r made (the tasks whose review was refused)",
                     pid, REFUSED_VIEW)
        self._views_in = pid

    def _linked(self, task: Mapping[str, Any]) -> Path | None:
        """The file under ``copy_dir`` that a task's image link names (None: another file)."""
        link = str((task.get("data") or {}).get("image") or "")
        if "?d=" not in link:
            return None
        path = self.document_root / unquote(link.split("?d=", 1)[1])
        return path if path.is_relative_to(self.copy_dir) else None

    def _sweep(self, pid: int, tasks: Sequence[Mapping[str, Any]], merged: set[str]) -> None:
        """Remove the copies no longer needed (module docstring): those that only the tasks of
        ``merged`` images link, those in project ``pid``'s folder that no task links, a deleted
        project's folder, and the temporary files of ``pid`` (and of the flat layout of older
        versions). ``tasks`` is project ``pid``'s export. Files that are not ours (other names)
        are left alone, and so is another project's folder while the server has the project."""
        live: set[Path] = set()
        done: set[Path] = set()
        for task in tasks:
            path = self._linked(task)
            if path is not None:
                (done if str((task.get("data") or {}).get("image_id")) in merged else live).add(path)
        own = self.copy_dir / str(pid)
        removed = sum(self._remove(path) for path in done - live if _copy_file(path.name))
        for folder in [self.copy_dir, *self._folders()]:
            gone = folder not in (self.copy_dir, own) and self._project_gone_for_copies(int(folder.name))
            for path in self._files(folder):
                killed = folder == self.copy_dir and path.suffix == ".tmp"  # the flat layout's
                if gone or ((killed or (folder == own and path not in live)) and self._unused(path)):
                    removed += self._remove(path)
            if gone:
                try:
                    folder.rmdir()
                except OSError as exc:  # a file that is not ours is left, and so the folder
                    log.warning("Label Studio copies: %s not removed: %s", folder, exc)
        if removed:
            log.info("removed %d Label Studio JPEG copies no longer needed (project %s)", removed, pid)

    def _unused(self, path: Path) -> bool:
        """Whether a copy or temporary file that no task links may go now: one of this appliance's
        images (a killed run's, a deleted task's) at once, another appliance's once it is
        ``FOREIGN_COPY_AGE_S`` old: younger, it may be that box's import in progress (module doc)."""
        start = path.name[1:].split(".", 1)[0] if path.name.startswith(".") else path.name[:-len(".jpg")]
        if self.holds is None or (_ID_START.match(start) is not None and self.holds(start)):
            return True
        try:
            return time.time() - path.stat().st_mtime >= FOREIGN_COPY_AGE_S
        except OSError:  # gone meanwhile, or unreadable: left
            return False

    def _project_gone_for_copies(self, pid: int) -> bool:
        """Whether project ``pid`` is deleted; any other answer keeps its copies (a server that
        does not answer now must not stop the collection whose reviews are already read)."""
        try:
            return self._project_gone(pid)
        except (PermanentError, RetryableError) as exc:
            log.warning("Label Studio copies of project %s kept for now: %s", pid, exc)
            return False

    def _folders(self) -> list[Path]:
        """The per-project folders in ``copy_dir`` (named by a project id)."""
        try:
            return [Path(e.path) for e in os.scandir(self.copy_dir) if e.is_dir(follow_symlinks=False)
                    and e.name.isascii() and e.name.isdigit()]  # "²" is a digit to isdigit
        except FileNotFoundError:
            return []
        except OSError as exc:  # unreadable: nothing removed, collecting goes on
            log.warning("Label Studio copies: %s not read: %s", self.copy_dir, exc)
            return []

    def _files(self, folder: Path) -> list[Path]:
        """The copies (``<name>.jpg``) and temporary files (``.<name>.<random>.tmp``) in ``folder``."""
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        except OSError as exc:  # unreadable: nothing removed, collecting goes on
            log.warning("Label Studio copies: %s not read: %s", folder, exc)
            return []
        return [Path(e.path) for e in entries if e.is_file(follow_symlinks=False) and _copy_file(e.name)]

    @staticmethod
    def _remove(path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:  # a read-only folder: the copy stays, collecting goes on
            log.warning("Label Studio copy %s not removed: %s", path, exc)
            return False
        return True

