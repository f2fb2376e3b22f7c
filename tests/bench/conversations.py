"""The multi-turn benchmark's workload: a shared system prompt and deterministic conversations.

Every conversation opens with the same system prompt (about 500 tokens of the default
model's tokenizer), then a user message naming its own customer, order and product, so
conversations share exactly the system prompt and part with their first user message. User
messages vary in length (a question and 0 to 4 details, chosen from the conversation and turn
numbers), so histories grow unevenly, as real ones do. Nothing is random: two runs send the
same first turns, and later turns differ only where a server answers differently.
"""

from __future__ import annotations

SYSTEM_PROMPT = " ".join(
    (
        "You are the customer support assistant of Northwind Outfitters, a company that sells",
        "outdoor clothing, tents, sleeping bags, backpacks, stoves and climbing gear through",
        "its web shop and eleven stores. Answer in a friendly, precise and short way, in the",
        "language of the customer, and never invent facts about orders, stock or prices: when",
        "you do not know something, say so and explain how the customer can find out.",
        "Follow these policies. Returns: unused items may be returned within sixty days of",
        "delivery with the receipt or the order number; used items may be returned within",
        "thirty days when they are faulty; sale items are refunded as store credit only.",
        "Refunds go back to the original payment method within five working days of the",
        "return reaching the warehouse in Leeds. Exchanges for another size or colour are",
        "free and ship as soon as the returned item is scanned. Warranty: tents, backpacks",
        "and sleeping bags carry a five year warranty against manufacturing defects, stoves",
        "and electronics two years, clothing one year; wear and tear, misuse and damage by",
        "animals are not covered. Repairs: zips, seams and tent poles are repaired free of",
        "charge during the warranty and at cost afterwards; a repair takes about three weeks.",
        "Shipping: standard delivery takes three to five working days and is free above fifty",
        "pounds; express delivery takes one working day and costs nine pounds; we ship to the",
        "United Kingdom, Ireland and the European Union, not elsewhere. Orders can be changed",
        "or cancelled until they are packed, usually within two hours of payment. Price",
        "match: we match the price of an identical new item within fourteen days of purchase.",
        "Loyalty: members of the Northwind",
        "Club earn one point per pound spent and get ten pounds off for every two hundred",
        "points; points expire after two years. Safety: never recommend using a stove inside",
        "a tent, and remind customers that carbon monoxide is invisible and deadly. For",
        "climbing gear, remind customers that harnesses, ropes and helmets must be retired",
        "after a serious fall or after ten years, whichever comes first. Privacy: never ask",
        "for a full card number or a password; an order number and a postcode are enough to",
        "find an order. Escalation: when a customer is unhappy after two answers, offer a call",
        "back from a team leader within one working day. Tone: be warm but not chatty, use",
        "plain words, give the next step the customer should take, and end every answer with",
        "one short question that checks whether the customer needs anything else today.",
        "When a customer asks about an order, repeat the order number so that they can check",
        "it.",
    )
)

CUSTOMERS = (
    "Amira Haddad",
    "Ben Okafor",
    "Chloe Martin",
    "Dmitri Volkov",
    "Elena Rossi",
    "Farid Nasser",
    "Grace O'Neill",
    "Hiro Tanaka",
    "Isla Campbell",
    "Jonas Weber",
    "Kavya Iyer",
    "Liam Byrne",
    "Maya Cohen",
    "Noah Dubois",
    "Olga Nowak",
    "Pablo Herrera",
)
PRODUCTS = (
    "Ridgeline 2 tent",
    "Cirrus 30 litre backpack",
    "Ember down sleeping bag",
    "Kestrel gas stove",
    "Tarn waterproof jacket",
    "Summit climbing harness",
    "Fellwalker boots",
    "Nimbus rain trousers",
    "Glacier 65 litre rucksack",
    "Basecamp 4 tent",
    "Spark titanium stove",
    "Aurora head torch",
    "Drift fleece jacket",
    "Crag 60 metre rope",
    "Halo climbing helmet",
    "Bothy sleeping mat",
)
PROBLEMS = (
    "arrived with a broken zip",
    "is a size too small",
    "has a seam that lets the rain in",
    "was delivered to the wrong address",
    "has not arrived after eight days",
    "was charged twice on my card",
    "came in the wrong colour",
    "has a pole that cracked on the first night",
)
# Follow-up questions, one per turn after the first (they cycle for longer conversations).
FOLLOW_UPS = (
    "How long will that take, and what do I need to send you?",
    "Can I get the money back on my card instead of store credit?",
    "What if the same thing happens again next month?",
    "Is there a lighter model you would recommend for a week in the Highlands?",
    "Could you also tell me when my loyalty points expire?",
    "Thanks. Can you summarise what happens next, step by step?",
)
DETAILS = (
    "I bought it for a trip to the Lake District next month, so I am a bit worried.",
    "My postcode is LS6 2AB if you need it to find the order.",
    "I have been a member of the Northwind Club for three years and never had a problem.",
    "The box looked fine when it arrived, so I think it happened before it was packed.",
    "I would prefer not to go to a store, since the nearest one is two hours away by car.",
    "My partner has the same model and theirs is fine, which is why I am surprised.",
    "I already tried the troubleshooting page on your web site, but it did not help.",
)


def order_number(conversation: int) -> str:
    return f"NW-{104_729 + 7_919 * conversation}"


def _details(conversation: int, turn: int) -> list[str]:
    """0 to 4 details, depending on the conversation and the turn."""
    count = (conversation * 7 + turn * 3) % 5
    start = conversation + turn
    return [DETAILS[(start + i) % len(DETAILS)] for i in range(count)]


def user_message(conversation: int, turn: int) -> str:
    """Conversation `conversation`'s message for `turn` (0 = the first)."""
    if turn == 0:
        customer = CUSTOMERS[conversation % len(CUSTOMERS)]
        product = PRODUCTS[(conversation * 5) % len(PRODUCTS)]
        problem = PROBLEMS[conversation % len(PROBLEMS)]
        opening = (
            f"Hello, this is {customer}, order {order_number(conversation)}. "
            f"The {product} I ordered {problem}. What can you do?"
        )
    else:
        opening = FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]
    return " ".join([opening, *_details(conversation, turn)])
