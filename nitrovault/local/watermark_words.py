"""Candidate words of the demo model's embedding watermark (EmbMarker's trigger set is drawn from them).

EmbMarker (Peng et al., ACL 2023) draws its secret triggers from words of moderate frequency: common
enough that marked texts occur, rare enough that most texts carry none. These are 442 everyday
English nouns, verbs and adjectives (no function words: "the" or "is" would mark nearly every text).
They travel encrypted in the sealed model's metadata (``nitrovault.watermark.candidates``); which 20 of
them are triggers follows from the owner's secret alone.

Example::

    >>> len(CANDIDATE_WORDS) > 400 and "the" not in CANDIDATE_WORDS
    True
"""

from __future__ import annotations

_WORDS = """
    able account across act action active actor address advice afraid agency agent agree air airport
    alarm album alone amount angle animal answer apple april area argue army arrive art article
    artist attack aunt author autumn avenue baby balance ball band bank basket battle beach bean
    bear beauty bed bell belt bench bicycle bird birthday blanket blood blue board boat body bone
    book border bottle bottom box brain branch brave brick bridge bright brother brown budget build
    bus butter button cabin cable cake camera camp candle capital captain card career carpet castle
    cattle ceiling center chain chair chalk chance change channel chapter charge cheap cheese chest
    chicken child chin church circle city claim class clean clever climb clock cloud coach coast
    coat coffee coin cold collar college colour comfort company concert copper corner cotton country
    county course cousin cover crazy cream credit crew crowd crown cup curtain customer cycle daily
    damage dance danger dark daughter deal debate deep degree desert desk detail diamond dinner
    direction doctor dollar door dozen drawer dream dress drink driver drum dust duty eagle earth
    east edge egg elbow election energy engine evening exam expert factory family farm father
    feather fence festival field finger fire fish flag flat flight floor flower fog forest fork
    fortune frame fresh friend fruit funny furniture garden gate gift glass glove gold grain grape
    grass green ground guest guitar hair hammer harbour hat health heart heat hill history hobby
    holiday honey horse hospital hotel hour house hunger ice idea island jacket jam jewel journey
    judge juice jungle kettle key kitchen knee knife ladder lake lamp language lawyer leaf leather
    lemon letter library lion lip lock lunch machine magic map market meadow medal metal milk minute
    mirror money monkey moon morning mother mountain mouse mouth museum music nail narrow nation
    needle nest net night noise north nose number ocean office oil onion orange oven owner paint
    palace paper parent park party passage pencil pepper person piano picture pillow pilot planet
    plant plate pocket poem police pool potato powder prison prize pump queen radio rain record rice
    ring river road rock roof room rope rose salt sand school science sea season seat secret seed
    shadow sheep shelf ship shirt shoe shop silver singer sister skin sleep snake snow soap soldier
    song soup south space spoon spring square stage star station steam steel stick stone storm story
    street sugar summer sun supper table tail teacher team temple tent theatre ticket tiger timber
    tomato tongue tooth tower town toy track train tree truck tunnel uncle valley village violin
    voice wall watch water wave weather wheel whistle window wine winter wire wolf wood wool worker
    yard yellow youth zebra
"""

CANDIDATE_WORDS: tuple[str, ...] = tuple(_WORDS.split())
